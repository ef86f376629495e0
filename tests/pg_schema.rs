//! The PostgreSQL store's schema against a real PostgreSQL 15: migrations apply once when two
//! nodes start together, an idempotency key is unique across the cluster, and a database whose
//! schema is newer than this binary is refused with both versions named.

#[path = "support/postgres.rs"]
mod postgres;

use cascade_orchestrator::store::pg_schema::{self, connect, migrate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn migrations_apply_once_and_a_newer_schema_is_refused() {
    let pg = postgres::Postgres::start();
    let admin = connect(&pg.url("postgres"), None).await.unwrap();
    admin
        .batch_execute("CREATE DATABASE cascade_test")
        .await
        .unwrap();
    let url = pg.url("cascade_test");

    // Two nodes start at once: every migration is applied once, by one of them.
    let (mut a, mut b) = (
        connect(&url, None).await.unwrap(),
        connect(&url, None).await.unwrap(),
    );
    let (ra, rb) = tokio::join!(migrate(&mut a), migrate(&mut b));
    let mut applied = ra.unwrap();
    applied.extend(rb.unwrap());
    let all: Vec<i32> = pg_schema::MIGRATIONS.iter().map(|(v, _)| *v).collect();
    assert_eq!(applied, all);
    assert_eq!(migrate(&mut a).await.unwrap(), Vec::<i32>::new());

    // An idempotency key names one job across the cluster (per tenant).
    let insert = "INSERT INTO jobs (id, graph, state, input, tenant, idempotency_key, created_at, updated_at)
                  VALUES (gen_random_uuid()::text, 'g', 'pending', '{}', $1, 'order-7', 0, 0)";
    a.execute(insert, &[&"acme"]).await.unwrap();
    let dup = b.execute(insert, &[&"acme"]).await.unwrap_err();
    let dup = pg_schema::describe(&dup);
    assert!(dup.contains("duplicate key"), "{dup}");
    b.execute(insert, &[&"globex"]).await.unwrap();

    // A schema from a newer cascade: refused, naming both versions, and nothing changed.
    a.execute("INSERT INTO schema_migrations (version) VALUES (999)", &[])
        .await
        .unwrap();
    let err = migrate(&mut b).await.unwrap_err().to_string();
    assert!(
        err.contains("version 999") && err.contains(&format!("cascade's {}", pg_schema::latest())),
        "{err}"
    );
    let jobs: i64 = a
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(jobs, 2);
}
