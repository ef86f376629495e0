//! Signed checkpoints of the audit log: the C2SP `tlog-checkpoint` body (origin, tree size,
//! base64 root hash) in a C2SP `signed-note` with an Ed25519 signature — the format of Go's
//! checksum database and of Sigstore's logs, so their verifiers read Cascade's checkpoints.
//!
//! Keys are written the signed-note way: a signer key
//! `PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>` (kept as a secret reference) and the
//! verifier key `<name>+<hash>+<base64(0x01 || public key)>` (printed by
//! `cascade audit public-key`), where `<hash>` is the first four bytes of
//! `SHA-256(name || "\n" || 0x01 || public key)` in hex. Hand-written: the format is a few lines
//! of text, and `ring` (already in the build) signs and verifies Ed25519.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

use super::hex;
use super::merkle::Hash;

/// The signature algorithm byte of Ed25519 in signed notes.
const ALG_ED25519: u8 = 0x01;

/// What a checkpoint commits to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name (e.g. `cascade.example.com/audit`).
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The checkpoint's body: three lines, each ending in a newline.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    fn parse(body: &str) -> Result<Self, String> {
        let mut lines = body.split_terminator('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or("no origin line")?;
        let size = lines
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("the second line is not a tree size")?;
        let root = lines
            .next()
            .and_then(|r| B64.decode(r).ok())
            .and_then(|r| <Hash>::try_from(r.as_slice()).ok())
            .ok_or("the third line is not a base64 SHA-256 root hash")?;
        Ok(Self {
            origin: origin.to_string(),
            size,
            root,
        })
    }
}

fn key_hash(name: &str, public: &[u8]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// A name is a non-empty run of printable characters without spaces or `+`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

/// A key's `<name>+<hash>+<base64(0x01 || 32 bytes)>`: the name, the hash as written, and the
/// 32 bytes of an Ed25519 key (`what`: "signer" or "verifier", for messages, which never echo
/// the key).
fn key_parts<'a>(text: &'a str, what: &str) -> Result<(&'a str, &'a str, Vec<u8>), String> {
    let mut parts = text.splitn(3, '+');
    let (Some(name), Some(hash), Some(material)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("a {what} key is <name>+<hash>+<key>"));
    };
    let raw = B64
        .decode(material)
        .map_err(|_| format!("the {what} key's last part is not base64"))?;
    match raw.split_first() {
        Some((&ALG_ED25519, key)) if key.len() == 32 => Ok((name, hash, key.to_vec())),
        Some(_) => Err(format!("the {what} key is not an Ed25519 key")),
        None => Err(format!("the {what} key is empty")),
    }
}

/// The server's checkpoint signer.
pub struct Signer {
    name: String,
    hash: [u8; 4],
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from its key, `PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>`. The message
    /// never echoes the key.
    pub fn from_key(key: &str) -> Result<Self, String> {
        let rest = key.trim().strip_prefix("PRIVATE+KEY+").ok_or(
            "a signer key starts with PRIVATE+KEY+ (make one with `cascade audit new-key NAME`)",
        )?;
        let (name, hash, seed) = key_parts(rest, "signer")?;
        let signer = Self::from_seed(name, &seed)?;
        if hex(&signer.hash) != hash {
            return Err("the signer key's hash does not match its name and key".into());
        }
        Ok(signer)
    }

    /// A signer named `name` from a 32-byte Ed25519 seed.
    pub fn from_seed(name: &str, seed: &[u8]) -> Result<Self, String> {
        if !valid_name(name) {
            return Err(format!(
                "{name:?} is not a valid key name (no spaces or '+')"
            ));
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| "not an Ed25519 seed".to_string())?;
        let hash = key_hash(name, pair.public_key().as_ref());
        Ok(Self {
            name: name.to_string(),
            hash,
            pair,
        })
    }

    /// A new signer key for `name`, from the system's randomness.
    pub fn generate(name: &str) -> Result<String, String> {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| "no randomness".to_string())?;
        let signer = Self::from_seed(name, &seed)?;
        let mut material = vec![ALG_ED25519];
        material.extend_from_slice(&seed);
        Ok(format!(
            "PRIVATE+KEY+{}+{}+{}",
            signer.name,
            hex(&signer.hash),
            B64.encode(material)
        ))
    }

    /// The key's name: the log's origin in its checkpoints.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier key: `<name>+<hash>+<base64(0x01 || public key)>`.
    pub fn verifier_key(&self) -> String {
        let mut material = vec![ALG_ED25519];
        material.extend_from_slice(self.pair.public_key().as_ref());
        format!("{}+{}+{}", self.name, hex(&self.hash), B64.encode(material))
    }

    /// `text` (lines, each ending in a newline) as a signed note.
    pub fn sign_note(&self, text: &str) -> String {
        let sig = self.pair.sign(text.as_bytes());
        let mut blob = self.hash.to_vec();
        blob.extend_from_slice(sig.as_ref());
        format!("{text}\n\u{2014} {} {}\n", self.name, B64.encode(blob))
    }

    /// The checkpoint, signed.
    pub fn sign(&self, checkpoint: &Checkpoint) -> String {
        self.sign_note(&checkpoint.body())
    }
}

/// A signed note's text, if `note` carries a valid signature by `verifier_key`
/// (`<name>+<hash>+<base64(0x01 || public key)>`); other signatures are ignored.
pub fn open_note(note: &str, verifier_key: &str) -> Result<String, String> {
    let (name, hash, public) = key_parts(verifier_key.trim(), "verifier")?;
    let public = public.as_slice();
    let expected = key_hash(name, public);
    if hex(&expected) != hash {
        return Err("the verifier key's hash does not match its name and key".into());
    }
    // The text ends at the last blank line; signature lines follow it.
    let split = note
        .rfind("\n\n")
        .ok_or("not a signed note: no blank line before the signatures")?;
    let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
    let key = UnparsedPublicKey::new(&ED25519, public);
    for line in sigs.lines() {
        let Some(rest) = line.strip_prefix("\u{2014} ") else {
            return Err(format!("not a signature line: {line:?}"));
        };
        let Some((who, blob)) = rest.split_once(' ') else {
            return Err(format!("not a signature line: {line:?}"));
        };
        if who != name {
            continue;
        }
        let Ok(blob) = B64.decode(blob) else {
            continue;
        };
        if blob.len() == 68
            && blob[..4] == expected
            && key.verify(text.as_bytes(), &blob[4..]).is_ok()
        {
            return Ok(text.to_string());
        }
    }
    Err(format!("no valid signature by {name}"))
}

/// The checkpoint in `note`, if `verifier_key` signed it.
pub fn verify(note: &str, verifier_key: &str) -> Result<Checkpoint, String> {
    Checkpoint::parse(&open_note(note, verifier_key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of Go's golang.org/x/mod/sumdb/note: Ed25519 signing is deterministic, so the
    // same key and text must give the same note, byte for byte.
    const GO_SIGNER: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_VERIFIER: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
    const GO_NOTE: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn notes_are_byte_for_byte_those_of_gos_sumdb_note() {
        let signer = Signer::from_key(GO_SIGNER).unwrap();
        assert_eq!(signer.verifier_key(), GO_VERIFIER);
        assert_eq!(signer.sign_note(GO_TEXT), GO_NOTE);
        assert_eq!(open_note(GO_NOTE, GO_VERIFIER).unwrap(), GO_TEXT);
        // One changed character, and it no longer verifies.
        let forged = GO_NOTE.replace("cryptography", "cryptographY");
        assert!(open_note(&forged, GO_VERIFIER).is_err());
    }

    #[test]
    fn a_checkpoint_round_trips_and_a_wrong_key_or_body_is_refused() {
        let key = Signer::generate("cascade.test/audit").unwrap();
        let signer = Signer::from_key(&key).unwrap();
        let cp = Checkpoint {
            origin: "cascade.test/audit".into(),
            size: 42,
            root: super::super::merkle::leaf_hash(b"x"),
        };
        let note = signer.sign(&cp);
        assert_eq!(verify(&note, &signer.verifier_key()).unwrap(), cp);
        let other = Signer::from_key(&Signer::generate("cascade.test/audit").unwrap()).unwrap();
        assert!(verify(&note, &other.verifier_key()).is_err());
        assert!(verify(&note.replacen("42", "43", 1), &signer.verifier_key()).is_err());
        // A key whose hash was edited is refused before anything is signed or checked.
        let bad = key.replacen('+', "+x", 3);
        assert!(Signer::from_key(&bad).is_err());
        assert!(
            Signer::from_key("sk-not-a-key")
                .unwrap_err()
                .contains("PRIVATE+KEY+")
        );
    }
}
