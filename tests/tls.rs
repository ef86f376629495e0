//! TLS and mutual TLS on both listeners of a real `cascade serve`, with certificates made here
//! (rcgen): a service client's certificate subject is its identity, a client without one
//! authenticates with a key, a certificate of another CA and a plaintext client are refused, the
//! CLI connects with --ca-file/--cert/--key, and a renewed certificate is served without a restart
//! (a broken one is not).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cascade_orchestrator::api::pb;
use cascade_orchestrator::api::pb::cascade_client::CascadeClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A CA, and the certificates it signs.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate and its key (PEM) for `cn`, valid for `sans`.
    fn sign(&self, cn: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Signed {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Signed(cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// A certificate (PEM), its key (PEM) and the certificate's DER.
struct Signed(String, String, Vec<u8>);

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

const GRAPH: &str = "[graph]\nname = \"g\"\n[agents.a]\nkind = \"sim\"\n";

/// A gRPC client over TLS trusting `ca`, showing `identity` (cert, key) if given.
async fn tls_client(
    grpc: u16,
    ca: &str,
    identity: Option<&Signed>,
) -> Result<CascadeClient<tonic::transport::Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(Signed(cert, key, _)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://localhost:{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(CascadeClient::new(channel))
}

fn submit() -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        graph: "g".into(),
        input_json: "{}".into(),
        ..Default::default()
    }
}

/// The DER of the certificate `client` is served on `url`.
async fn served_cert(client: &reqwest::Client, url: &str) -> Vec<u8> {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("TLS info with the server's certificate")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_on_both_listeners() {
    let ca = Ca::new("Cascade Test CA");
    let rogue = Ca::new("Someone Else's CA");
    let server_cert = ca.sign(
        "cascade",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let billing = ca.sign("billing-service", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let stranger = ca.sign("stranger", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let forged = rogue.sign("billing-service", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let admin_key = cascade_orchestrator::auth::generate_key();

    let dir = common::server_dir(
        &[("g.toml", GRAPH)],
        &format!(
            r#"
[server.tls]
cert = "tls.crt"
key = "tls.key"
client_ca = "ca.crt"

[[auth.client_certs]]
subject = "billing-service"
tenant = "acme"
roles = ["submit", "read"]

[[auth.api_keys]]
name = "ops"
tenant = "internal"
roles = ["admin"]
hash = "{}"
"#,
            cascade_orchestrator::auth::sha256_hash(&admin_key)
        ),
    );
    let d = dir.path();
    write(d, "tls.crt", &server_cert.0);
    write(d, "tls.key", &server_cert.1);
    write(d, "ca.crt", &ca.pem);
    for (name, Signed(cert, key, _)) in [("billing", &billing), ("stranger", &stranger)] {
        write(d, &format!("{name}.crt"), cert);
        write(d, &format!("{name}.key"), key);
    }
    let (grpc, http) = (common::free_port(), common::free_port());
    let _server = common::spawn(d, grpc, http);

    // The service client's certificate is its identity: acme, submit + read.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut billing_client = loop {
        match tls_client(grpc, &ca.pem, Some(&billing)).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("no TLS server: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let id = billing_client
        .submit_job(submit())
        .await
        .expect("the certificate's identity may submit")
        .into_inner()
        .job_id;
    let job = billing_client
        .get_job(pb::GetJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.tenant, "acme");
    let e = billing_client
        .resolve_approval(pb::ResolveApprovalRequest {
            approval_id: format!("{id}/a"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // A certificate the CA signed for a subject no identity names: UNAUTHENTICATED, naming it.
    let mut stranger_client = tls_client(grpc, &ca.pem, Some(&stranger)).await.unwrap();
    let e = stranger_client.submit_job(submit()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("stranger"), "{e:?}");

    // No certificate: the connection is made, and the caller authenticates with a key.
    let mut anonymous = tls_client(grpc, &ca.pem, None).await.unwrap();
    let e = anonymous.submit_job(submit()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut req = tonic::Request::new(pb::ListJobsRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {admin_key}").parse().unwrap(),
    );
    let listed = anonymous.list_jobs(req).await.unwrap().into_inner();
    assert!(listed.jobs.iter().any(|j| j.job_id == id));

    // A certificate of another CA with the same subject: the handshake fails.
    let refused = match tls_client(grpc, &ca.pem, Some(&forged)).await {
        Err(_) => true,
        Ok(mut c) => c.submit_job(submit()).await.is_err(),
    };
    assert!(refused, "a certificate of another CA is refused");

    // A plaintext client gets no answer from the TLS port.
    let plain = async {
        let mut c = CascadeClient::connect(format!("http://127.0.0.1:{grpc}")).await?;
        c.list_graphs(pb::ListGraphsRequest {})
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let plain = tokio::time::timeout(Duration::from_secs(15), plain)
        .await
        .expect("refused, not hung");
    assert!(plain.is_err(), "a plaintext gRPC call is refused");

    // HTTP: the same certificates; probes need none; plaintext is refused.
    let https = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap()])
        .identity(
            reqwest::Identity::from_pem(format!("{}{}", billing.0, billing.1).as_bytes()).unwrap(),
        )
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let graphs = https
        .get(format!("https://localhost:{http}/api/graphs"))
        .send()
        .await
        .unwrap();
    assert_eq!(graphs.status(), 200);
    let no_cert = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap()])
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let healthz = format!("https://localhost:{http}/healthz");
    assert_eq!(no_cert.get(&healthz).send().await.unwrap().status(), 200);
    assert_eq!(
        no_cert
            .get(format!("https://localhost:{http}/api/graphs"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(
        reqwest::get(format!("http://127.0.0.1:{http}/healthz"))
            .await
            .is_err(),
        "plaintext HTTP is refused"
    );

    // The CLI: --ca-file, --cert, --key.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args([
            "jobs",
            "list",
            "--server",
            &format!("https://localhost:{grpc}"),
        ])
        .arg("--ca-file")
        .arg(d.join("ca.crt"))
        .arg("--cert")
        .arg(d.join("billing.crt"))
        .arg("--key")
        .arg(d.join("billing.key"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    // Without the CA, the server's certificate is not trusted: a clear error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args([
            "jobs",
            "list",
            "--server",
            &format!("https://localhost:{grpc}"),
        ])
        .env("CASCADE_TOKEN", &admin_key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the Cascade server"), "{err}");

    // A broken certificate file keeps the one being served; a renewed one is served to new
    // connections, without a restart.
    assert_eq!(served_cert(&no_cert, &healthz).await, server_cert.2);
    write(d, "tls.crt", "-----BEGIN CERTIFICATE-----\nbroken\n");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(served_cert(&no_cert, &healthz).await, server_cert.2);
    let renewed = ca.sign(
        "cascade-renewed",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    write(d, "tls.key", &renewed.1);
    write(d, "tls.crt", &renewed.0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while served_cert(&no_cert, &healthz).await != renewed.2 {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(d.join("server.log")).unwrap();
    assert!(
        log.contains("still serving the previous certificate"),
        "{log}"
    );
}
