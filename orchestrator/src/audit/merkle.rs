//! The audit log's Merkle tree, as RFC 9162 (Certificate Transparency 2.0) defines it: leaves
//! and interior nodes hashed with SHA-256 under different prefixes (0x00, 0x01), so that a leaf
//! can never pass for a node; the tree of n leaves splits at the largest power of two below n.
//! Inclusion proofs show that a record is in the tree a root commits to; consistency proofs that
//! a later tree extends an earlier one, record for record (the log was only appended to).
//!
//! Hand-written rather than taken from a crate: the RFC's algorithms are short, and the crates
//! that implement them bring their own storage or hash plumbing; this one works on the leaf
//! hashes the store keeps.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// RFC 9162 2.1.1: `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// RFC 9162 2.1.1: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The hash of the empty tree: `SHA-256()`.
pub fn empty_root() -> Hash {
    Sha256::new().finalize().into()
}

/// The largest power of two smaller than `n` (n > 1).
fn split(n: usize) -> usize {
    debug_assert!(n > 1);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root of the tree over `leaves` (leaf hashes), RFC 9162 2.1.1.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The inclusion proof of leaf `index` in the tree over `leaves`, RFC 9162 2.1.3.1.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Vec<Hash> {
    assert!(index < leaves.len(), "leaf {index} of {}", leaves.len());
    let mut proof = Vec::new();
    let (mut lo, mut hi, mut m) = (0, leaves.len(), index);
    // Top-down, then reversed: the proof lists siblings from the leaf up.
    while hi - lo > 1 {
        let k = split(hi - lo);
        if m < k {
            proof.push(root(&leaves[lo + k..hi]));
            hi = lo + k;
        } else {
            proof.push(root(&leaves[lo..lo + k]));
            lo += k;
            m -= k;
        }
    }
    proof.reverse();
    proof
}

/// Whether `proof` shows leaf `leaf` at `index` in a tree of `size` leaves with root `root`,
/// RFC 9162 2.1.3.2.
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

/// The consistency proof between the tree of the first `m` leaves and the tree over all of
/// `leaves`, RFC 9162 2.1.4.1.
pub fn consistency_proof(leaves: &[Hash], m: usize) -> Vec<Hash> {
    assert!(0 < m && m <= leaves.len(), "size {m} of {}", leaves.len());
    fn subproof(m: usize, leaves: &[Hash], complete: bool, out: &mut Vec<Hash>) {
        let n = leaves.len();
        if m == n {
            if !complete {
                out.push(root(leaves));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            subproof(m, &leaves[..k], complete, out);
            out.push(root(&leaves[k..]));
        } else {
            subproof(m - k, &leaves[k..], false, out);
            out.push(root(&leaves[..k]));
        }
    }
    let mut out = Vec::new();
    subproof(m, leaves, true, &mut out);
    out
}

/// Whether `proof` shows that the tree of `size2` leaves with root `root2` extends the tree of
/// `size1` leaves with root `root1`, RFC 9162 2.1.4.2.
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    proof: &[Hash],
    root1: &Hash,
    root2: &Hash,
) -> bool {
    if size1 > size2 {
        return false;
    }
    if size1 == size2 {
        return proof.is_empty() && root1 == root2;
    }
    if size1 == 0 {
        return proof.is_empty();
    }
    if proof.is_empty() {
        return false;
    }
    // A first tree that is a complete subtree is not in the proof: it starts it.
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if size1.is_power_of_two() {
        path.push(*root1);
    }
    path.extend_from_slice(proof);
    let (mut f_n, mut s_n) = (size1 - 1, size2 - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut f_r, mut s_r) = (path[0], path[0]);
    for c in &path[1..] {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            f_r = node_hash(c, &f_r);
            s_r = node_hash(c, &s_r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            s_r = node_hash(&s_r, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    f_r == *root1 && s_r == *root2 && s_n == 0
}

/// A tree being appended to, in O(log n) memory: the roots of its complete subtrees, largest
/// first (a leaf's position in binary). What the server keeps to sign a checkpoint without
/// reading the whole log again.
#[derive(Clone, Debug, Default)]
pub struct Frontier {
    size: u64,
    /// (height, root) of each complete subtree, left to right.
    stack: Vec<(u32, Hash)>,
}

impl Frontier {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(h, left)) = self.stack.last() {
            if h != node.0 {
                break;
            }
            self.stack.pop();
            node = (h + 1, node_hash(&left, &node.1));
        }
        self.stack.push(node);
        self.size += 1;
    }

    /// The frontier as bytes, to be kept beside a checkpoint: the size (8 bytes, big-endian),
    /// then each complete subtree's height (4 bytes) and root (32).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.stack.len() * 36);
        out.extend_from_slice(&self.size.to_be_bytes());
        for (h, root) in &self.stack {
            out.extend_from_slice(&h.to_be_bytes());
            out.extend_from_slice(root);
        }
        out
    }

    /// A frontier from [`to_bytes`](Self::to_bytes), if the bytes are one: the subtrees'
    /// heights falling from left to right and adding up to the size.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (size, mut rest) = bytes.split_first_chunk::<8>()?;
        let size = u64::from_be_bytes(*size);
        let mut stack = Vec::new();
        while !rest.is_empty() {
            let (h, tail) = rest.split_first_chunk::<4>()?;
            let (root, tail) = tail.split_first_chunk::<32>()?;
            let h = u32::from_be_bytes(*h);
            if h >= 64 || stack.last().is_some_and(|&(prev, _)| prev <= h) {
                return None;
            }
            stack.push((h, *root));
            rest = tail;
        }
        let total: u64 = stack.iter().map(|(h, _)| 1u64 << h).sum();
        (total == size).then_some(Self { size, stack })
    }

    /// The root of the tree so far: the complete subtrees folded from the right.
    pub fn root(&self) -> Hash {
        let mut it = self.stack.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return empty_root();
        };
        for (_, left) in it {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frontier_survives_its_bytes_and_bad_bytes_are_refused() {
        let mut f = Frontier::default();
        for i in 0..13u8 {
            f.push(leaf_hash(&[i]));
            let back = Frontier::from_bytes(&f.to_bytes()).unwrap();
            assert_eq!((back.size(), back.root()), (f.size(), f.root()));
        }
        let mut bytes = f.to_bytes();
        bytes[7] ^= 1;
        assert!(
            Frontier::from_bytes(&bytes).is_none(),
            "a size the subtrees do not add up to"
        );
        assert!(Frontier::from_bytes(&f.to_bytes()[..20]).is_none());
        assert_eq!(
            Frontier::from_bytes(&Frontier::default().to_bytes())
                .unwrap()
                .size(),
            0
        );
    }

    fn hex(h: &Hash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The inputs and roots of the Certificate Transparency reference tests (RFC 6962's trees,
    /// which RFC 9162 keeps).
    fn vectors() -> (Vec<Hash>, [&'static str; 8]) {
        let inputs: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        (inputs.iter().map(|d| leaf_hash(d)).collect(), roots)
    }

    #[test]
    fn roots_match_the_certificate_transparency_reference_trees() {
        let (leaves, roots) = vectors();
        assert_eq!(
            hex(&root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut f = Frontier::default();
        for n in 1..=8 {
            assert_eq!(hex(&root(&leaves[..n])), roots[n - 1], "tree of {n}");
            f.push(leaves[n - 1]);
            assert_eq!(f.root(), root(&leaves[..n]), "frontier of {n}");
        }
    }

    #[test]
    fn a_consistency_proof_of_the_reference_trees_is_the_published_one() {
        let (leaves, roots) = vectors();
        let unhex = |s: &str| -> Hash {
            let v: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            v.try_into().unwrap()
        };
        // The proof from the tree of 2 to the tree of 5 in the reference tests.
        let published = [
            unhex("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            unhex("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ];
        assert_eq!(consistency_proof(&leaves[..5], 2), published);
        assert!(verify_consistency(
            2,
            5,
            &published,
            &unhex(roots[1]),
            &unhex(roots[4])
        ));
    }

    #[test]
    fn every_inclusion_and_consistency_proof_verifies_and_a_wrong_one_does_not() {
        // Leaves of a larger tree, to cover uneven splits.
        let leaves: Vec<Hash> = (0u32..37).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for n in 1..=leaves.len() {
            let tree = &leaves[..n];
            let r = root(tree);
            for i in 0..n {
                let p = inclusion_proof(tree, i);
                assert!(
                    verify_inclusion(&tree[i], i as u64, n as u64, &p, &r),
                    "{i} in {n}"
                );
                // Another leaf, another index, another root: refused.
                assert!(!verify_inclusion(
                    &leaf_hash(b"forged"),
                    i as u64,
                    n as u64,
                    &p,
                    &r
                ));
                if n > 1 {
                    assert!(!verify_inclusion(
                        &tree[i],
                        ((i + 1) % n) as u64,
                        n as u64,
                        &p,
                        &r
                    ));
                }
            }
            for m in 1..=n {
                let p = consistency_proof(tree, m);
                let r1 = root(&leaves[..m]);
                assert!(
                    verify_consistency(m as u64, n as u64, &p, &r1, &r),
                    "{m} → {n}"
                );
                if m < n {
                    // A first tree that was altered is not extended by the second.
                    let mut altered = leaves[..m].to_vec();
                    altered[m - 1] = leaf_hash(b"altered");
                    assert!(!verify_consistency(
                        m as u64,
                        n as u64,
                        &p,
                        &root(&altered),
                        &r
                    ));
                }
            }
        }
    }
}
