//! The process-wide budget for response bodies being read (a test binary of its own: the
//! budget is the process's, and this test spends it).

use std::sync::Arc;

use cascade_agents::ErrorClass;
use cascade_agents::http::{RESPONSE_MEMORY_BYTES, read_capped};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server on 127.0.0.1 answering every connection with a `len`-byte body; with `hold`, it
/// sends all but 1 KiB of it, then waits for `hold` before the rest.
async fn server(len: usize, hold: Option<Arc<tokio::sync::Notify>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let hold = hold.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
                );
                let _ = s.write_all(head.as_bytes()).await;
                let body = vec![b'x'; len];
                match hold {
                    Some(n) => {
                        let _ = s.write_all(&body[..len - 1024]).await;
                        n.notified().await;
                        let _ = s.write_all(&body[len - 1024..]).await;
                    }
                    None => {
                        let _ = s.write_all(&body).await;
                    }
                }
            });
        }
    });
    format!("http://127.0.0.1:{port}/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_the_process_budget_fails_as_transient_and_the_budget_comes_back() {
    let small = server(64 << 10, None).await;
    let read = |url: String| async move {
        read_capped(
            reqwest::get(&url).await.unwrap(),
            RESPONSE_MEMORY_BYTES as u64,
        )
        .await
    };
    assert_eq!(read(small.clone()).await.unwrap().len(), 64 << 10);
    // A slow body holds all but 32 KiB of the budget while it is read.
    let release = Arc::new(tokio::sync::Notify::new());
    let big = server(RESPONSE_MEMORY_BYTES - (32 << 10), Some(release.clone())).await;
    let slow = tokio::spawn(read(big));
    // Until it has taken its memory, a small read may still pass; then it may not.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let refused = loop {
        match read(small.clone()).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the budget never filled"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(refused.class, ErrorClass::Transient, "{refused}");
    assert!(refused.message.contains("response memory"), "{refused}");
    // The slow body ends: its memory comes back, and the small read passes again.
    release.notify_one();
    assert_eq!(
        slow.await.unwrap().unwrap().len(),
        RESPONSE_MEMORY_BYTES - (32 << 10)
    );
    assert_eq!(read(small).await.unwrap().len(), 64 << 10);
}
