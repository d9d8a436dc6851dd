//! Every storage provider against the same contract: ETag concurrency,
//! clear, versions never reused; redb across reopening and across a silo
//! restart. The same for every provider's reminder table: one row per
//! reminder, per-row ETags, every key variant.

use granary_actors::{
    DueUpdate, GrainId, GrainKey, MemoryStorage, NewReminder, RedbStorage, ReminderRow,
    ReminderTable, SqliteStorage, StorageError, StorageProvider,
};

/// A grain of a type named `namespace`: a database that outlives the test
/// gets a fresh namespace each run.
fn id_in(namespace: &str, key: &str) -> GrainId {
    GrainId {
        type_name: namespace.into(),
        key: GrainKey::from(key),
    }
}

fn id(key: &str) -> GrainId {
    id_in("account", key)
}

async fn contract(storage: &dyn StorageProvider) {
    contract_in(storage, "account").await;
}

async fn contract_in(storage: &dyn StorageProvider, namespace: &str) {
    let id = |key: &str| id_in(namespace, key);
    let grain = id("alice");
    assert_eq!(storage.read(&grain).await.unwrap(), None);
    // A write that expects a version where none is stored is stale.
    assert!(matches!(
        storage.write(&grain, b"x", Some(7)).await,
        Err(StorageError::Conflict {
            expected: Some(7),
            actual: None,
            ..
        })
    ));
    let first = storage.write(&grain, b"one", None).await.unwrap();
    let stored = storage.read(&grain).await.unwrap().unwrap();
    assert_eq!((stored.data.as_slice(), stored.etag), (&b"one"[..], first));
    // A second writer that read nothing loses.
    assert!(matches!(
        storage.write(&grain, b"lost", None).await,
        Err(StorageError::Conflict { .. })
    ));
    let second = storage.write(&grain, b"two", Some(first)).await.unwrap();
    assert_ne!(first, second);
    // The first version is stale now.
    assert!(matches!(
        storage.write(&grain, b"stale", Some(first)).await,
        Err(StorageError::Conflict { .. })
    ));
    assert!(matches!(
        storage.clear(&grain, Some(first)).await,
        Err(StorageError::Conflict { .. })
    ));
    storage.clear(&grain, Some(second)).await.unwrap();
    assert_eq!(storage.read(&grain).await.unwrap(), None);
    // Written again after a clear: a version never seen before, so a writer
    // still holding an old one cannot slip through.
    let third = storage.write(&grain, b"three", None).await.unwrap();
    assert!(third != first && third != second);
    assert!(matches!(
        storage.write(&grain, b"stale", Some(first)).await,
        Err(StorageError::Conflict { .. })
    ));
    // Other grains are independent.
    assert_eq!(storage.read(&id("bob")).await.unwrap(), None);
}

/// Grains of every key variant, with keys that are prefixes of others (a
/// grain's rows must not take in another's).
fn every_key_variant(namespace: &str) -> Vec<GrainId> {
    [
        GrainKey::from("a"),
        GrainKey::from("ab"),
        GrainKey::from(""),
        GrainKey::from("ünïcode/ключ"),
        GrainKey::from(0),
        GrainKey::from(u64::MAX),
        GrainKey::from(uuid::Uuid::from_u128(
            0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        )),
        GrainKey::from((7, "ext")),
        GrainKey::from((7, "ex")),
        GrainKey::from((u64::MAX, "")),
    ]
    .into_iter()
    .map(|key| GrainId {
        type_name: namespace.to_string(),
        key,
    })
    .collect()
}

/// The rows of `table` in `namespace`, sorted.
async fn rows_in(table: &dyn ReminderTable, namespace: &str) -> Vec<ReminderRow> {
    let mut rows: Vec<ReminderRow> = table
        .read_all()
        .await
        .unwrap()
        .into_iter()
        .filter(|row| row.grain.type_name == namespace)
        .collect();
    rows.sort_by(|a, b| (&a.grain, &a.name).cmp(&(&b.grain, &b.name)));
    rows
}

async fn reminder_contract(storage: &dyn StorageProvider, namespace: &str) {
    let table = storage.reminder_table().expect("a reminder table");
    let grains = every_key_variant(namespace);
    let alice = &grains[0];
    assert_eq!(table.read_grain(alice).await.unwrap(), vec![]);
    assert_eq!(table.delete(alice, "wake").await.unwrap(), None);
    // A conditional write to a row that is not there is stale.
    assert!(matches!(
        table.update_due(alice, "wake", 5, 1).await,
        Err(StorageError::Conflict {
            expected: Some(1),
            actual: None,
            ..
        })
    ));

    // Every key variant round-trips, each grain's rows apart.
    let mut expected = Vec::new();
    for (i, grain) in grains.iter().enumerate() {
        let i = i as u64;
        for name in ["wake", "sleep"] {
            let etag = table.upsert(grain, name, 10 + i, 1_000 + i).await.unwrap();
            expected.push(ReminderRow {
                grain: grain.clone(),
                name: name.to_string(),
                period_ms: 10 + i,
                next_due_ms: 1_000 + i,
                etag,
            });
        }
    }
    expected.sort_by(|a, b| (&a.grain, &a.name).cmp(&(&b.grain, &b.name)));
    assert_eq!(rows_in(table, namespace).await, expected);
    for grain in &grains {
        let mut own = table.read_grain(grain).await.unwrap();
        own.sort_by(|a, b| a.name.cmp(&b.name));
        let mine: Vec<ReminderRow> = expected
            .iter()
            .filter(|row| row.grain == *grain)
            .cloned()
            .collect();
        assert_eq!(own, mine, "{grain}");
    }

    // Conditional update: moves the due time and the ETag, keeps the period.
    let first = table.upsert(alice, "wake", 100, 5_000).await.unwrap();
    let second = table.update_due(alice, "wake", 5_100, first).await.unwrap();
    assert!(second > first, "ETags grow");
    assert!(matches!(
        table.update_due(alice, "wake", 9_999, first).await,
        Err(StorageError::Conflict { expected: Some(e), actual: Some(a), .. }) if e == first && a == second
    ));
    let row = |rows: Vec<ReminderRow>| rows.into_iter().find(|row| row.name == "wake");
    let stored = row(table.read_grain(alice).await.unwrap()).unwrap();
    assert_eq!(
        (stored.period_ms, stored.next_due_ms, stored.etag),
        (100, 5_100, second)
    );
    // An upsert replaces whatever is stored, with a newer ETag.
    let third = table.upsert(alice, "wake", 200, 6_000).await.unwrap();
    assert!(third > second);
    assert!(matches!(
        table.update_due(alice, "wake", 9_999, second).await,
        Err(StorageError::Conflict { .. })
    ));
    // The largest time the service writes (2^63 - 1) round-trips.
    let far = (1u64 << 63) - 1;
    let fourth = table.update_due(alice, "wake", far, third).await.unwrap();
    assert_eq!(
        row(table.read_grain(alice).await.unwrap())
            .unwrap()
            .next_due_ms,
        far
    );

    // Delete answers the ETag it removed, once.
    assert_eq!(table.delete(alice, "wake").await.unwrap(), Some(fourth));
    assert_eq!(table.delete(alice, "wake").await.unwrap(), None);
    assert!(row(table.read_grain(alice).await.unwrap()).is_none());
    assert!(matches!(
        table.update_due(alice, "wake", 1, fourth).await,
        Err(StorageError::Conflict { actual: None, .. })
    ));
    // Registered again: a version never seen before.
    let fifth = table.upsert(alice, "wake", 1, 1).await.unwrap();
    assert!(fifth > fourth);
    assert!(matches!(
        table.update_due(alice, "wake", 2, fourth).await,
        Err(StorageError::Conflict { .. })
    ));

    // Batches: each update with its own outcome.
    let bob = &grains[4];
    let bob_etag = expected
        .iter()
        .find(|row| row.grain == *bob && row.name == "wake")
        .unwrap()
        .etag;
    let outcome = table
        .update_due_batch(&[
            DueUpdate {
                grain: alice.clone(),
                name: "wake".into(),
                next_due_ms: 77,
                expected: fifth,
            },
            DueUpdate {
                grain: bob.clone(),
                name: "wake".into(),
                next_due_ms: 88,
                expected: fifth, // stale
            },
            DueUpdate {
                grain: bob.clone(),
                name: "sleep-not-there".into(),
                next_due_ms: 88,
                expected: bob_etag,
            },
        ])
        .await
        .unwrap();
    assert_eq!(outcome.len(), 3);
    assert!(matches!(outcome[0], Ok(etag) if etag > fifth));
    assert!(matches!(
        outcome[1],
        Err(StorageError::Conflict { actual: Some(a), .. }) if a == bob_etag
    ));
    assert!(matches!(
        outcome[2],
        Err(StorageError::Conflict { actual: None, .. })
    ));
    assert_eq!(
        row(table.read_grain(alice).await.unwrap())
            .unwrap()
            .next_due_ms,
        77
    );
    assert_eq!(
        row(table.read_grain(bob).await.unwrap())
            .unwrap()
            .next_due_ms,
        1_004
    );
    let batch: Vec<NewReminder> = (0..3)
        .map(|i| NewReminder {
            grain: grains[7].clone(),
            name: format!("batch-{i}"),
            period_ms: 5,
            next_due_ms: 50 + i,
        })
        .collect();
    let outcome = table.upsert_batch(&batch).await.unwrap();
    assert!(outcome.iter().all(Result::is_ok));
    assert_eq!(table.read_grain(&grains[7]).await.unwrap().len(), 5);

    // Leave a shared database as it was found.
    for row in rows_in(table, namespace).await {
        assert_eq!(
            table.delete(&row.grain, &row.name).await.unwrap(),
            Some(row.etag)
        );
    }
    assert_eq!(rows_in(table, namespace).await, vec![]);
}

/// A provider that keeps no reminder table: the default.
struct NoTable;

impl StorageProvider for NoTable {
    fn read<'a>(
        &'a self,
        _: &'a GrainId,
    ) -> futures_util::future::BoxFuture<
        'a,
        Result<Option<granary_actors::storage::StoredState>, StorageError>,
    > {
        Box::pin(async { Ok(None) })
    }
    fn write<'a>(
        &'a self,
        _: &'a GrainId,
        _: &'a [u8],
        _: Option<granary_actors::ETag>,
    ) -> futures_util::future::BoxFuture<'a, Result<granary_actors::ETag, StorageError>> {
        Box::pin(async { Ok(1) })
    }
    fn clear<'a>(
        &'a self,
        _: &'a GrainId,
        _: Option<granary_actors::ETag>,
    ) -> futures_util::future::BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async { Ok(()) })
    }
}

#[test]
fn a_provider_keeps_no_reminder_table_unless_it_says_so() {
    assert!(NoTable.reminder_table().is_none());
    assert!(MemoryStorage::new().reminder_table().is_some());
}

#[tokio::test]
async fn memory_storage_keeps_the_contract() {
    contract(&MemoryStorage::new()).await;
}

#[tokio::test]
async fn memory_reminder_table_keeps_the_contract() {
    reminder_contract(&MemoryStorage::new(), "alarm").await;
}

#[tokio::test]
async fn redb_reminder_table_keeps_the_contract_and_its_rows_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reminders.redb");
    let grain = GrainId {
        type_name: "alarm".into(),
        key: GrainKey::from((3, "kept")),
    };
    let etag = {
        let storage = RedbStorage::open(&path).unwrap();
        reminder_contract(&storage, "alarm").await;
        let table = storage.reminder_table().unwrap();
        table.upsert(&grain, "kept", 10, 20).await.unwrap()
    };
    let reopened = RedbStorage::open(&path).unwrap();
    let table = reopened.reminder_table().unwrap();
    let rows = table.read_all().await.unwrap();
    assert_eq!(
        rows,
        vec![ReminderRow {
            grain: grain.clone(),
            name: "kept".into(),
            period_ms: 10,
            next_due_ms: 20,
            etag,
        }]
    );
    // The version counter is shared with grain state and survived.
    assert!(table.update_due(&grain, "kept", 30, etag).await.unwrap() > etag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_reminder_table_keeps_the_contract_and_is_shared_by_two_handles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reminders.sqlite");
    let storage = SqliteStorage::open(&path).unwrap();
    reminder_contract(&storage, "alarm").await;
    let other = SqliteStorage::open(&path).unwrap();
    let (mine, theirs) = (
        storage.reminder_table().unwrap(),
        other.reminder_table().unwrap(),
    );
    let grain = GrainId {
        type_name: "alarm".into(),
        key: GrainKey::from(uuid::Uuid::from_u128(9)),
    };
    let mut etag = mine.upsert(&grain, "wake", 10, 100).await.unwrap();
    assert_eq!(theirs.read_grain(&grain).await.unwrap()[0].etag, etag);
    // Owners racing from both handles: exactly one write wins each round.
    for round in 0..20 {
        let (a, b) = tokio::join!(
            mine.update_due(&grain, "wake", 200 + round, etag),
            theirs.update_due(&grain, "wake", 300 + round, etag)
        );
        match (a, b) {
            (Ok(won), Err(StorageError::Conflict { .. }))
            | (Err(StorageError::Conflict { .. }), Ok(won)) => etag = won,
            other => panic!("round {round}: {other:?}"),
        }
    }
    assert_eq!(theirs.delete(&grain, "wake").await.unwrap(), Some(etag));
    assert_eq!(mine.read_grain(&grain).await.unwrap(), vec![]);
}

#[tokio::test]
async fn redb_storage_keeps_the_contract_and_the_data_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grains.redb");
    {
        let storage = RedbStorage::open(&path).unwrap();
        contract(&storage).await;
        storage.write(&id("carol"), b"kept", None).await.unwrap();
    }
    let reopened = RedbStorage::open(&path).unwrap();
    let stored = reopened.read(&id("carol")).await.unwrap().unwrap();
    assert_eq!(stored.data, b"kept");
    // The version counter survived too: a new version is new.
    let next = reopened
        .write(&id("carol"), b"again", Some(stored.etag))
        .await
        .unwrap();
    assert!(next > stored.etag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_storage_keeps_the_contract_and_is_shared_by_two_handles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grains.sqlite");
    let storage = SqliteStorage::open(&path).unwrap();
    contract(&storage).await;
    // A second connection to the file (as another process would have)
    // sees the writes and the conflicts.
    let other = SqliteStorage::open(&path).unwrap();
    let grain = id("shared");
    let first = storage.write(&grain, b"one", None).await.unwrap();
    assert_eq!(other.read(&grain).await.unwrap().unwrap().etag, first);
    assert!(matches!(
        other.write(&grain, b"stale", None).await,
        Err(StorageError::Conflict { .. })
    ));
    // Writers racing from both handles: exactly one wins each round.
    let mut etag = other.write(&grain, b"two", Some(first)).await.unwrap();
    for round in 0..20 {
        let (a, b) = tokio::join!(
            storage.write(&grain, b"a", Some(etag)),
            other.write(&grain, b"b", Some(etag))
        );
        match (a, b) {
            (Ok(won), Err(StorageError::Conflict { .. }))
            | (Err(StorageError::Conflict { .. }), Ok(won)) => etag = won,
            other => panic!("round {round}: {other:?}"),
        }
    }
    drop((storage, other));
    let reopened = SqliteStorage::open(&path).unwrap();
    assert_eq!(reopened.read(&grain).await.unwrap().unwrap().etag, etag);
}

/// Silo processes started together open one new file at once (the
/// multi-node demo does): every open succeeds, none is refused for the
/// lock another holds while it switches the file to WAL.
#[test]
fn sqlite_storage_opened_by_many_at_once_opens_for_all() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grains.sqlite");
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        let openers: Vec<_> = (0..8)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    SqliteStorage::open(&path).map(drop)
                })
            })
            .collect();
        for opener in openers {
            if let Err(err) = opener.join().unwrap() {
                panic!("round {round}: {err}");
            }
        }
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.redb");
    std::fs::write(&path, b"this is not a redb file at all, just some bytes").unwrap();
    assert!(matches!(
        RedbStorage::open(&path),
        Err(StorageError::Backend(_))
    ));
    let path = dir.path().join("garbage.sqlite");
    std::fs::write(&path, b"this is not a sqlite file at all, just some bytes").unwrap();
    assert!(matches!(
        SqliteStorage::open(&path),
        Err(StorageError::Backend(_))
    ));
}

#[cfg(granary_postgres)]
const POSTGRES: &str = env!("GRANARY_POSTGRES_URL");

#[tokio::test]
#[cfg_attr(
    not(granary_postgres),
    ignore = "set GRANARY_POSTGRES_URL to a PostgreSQL server (CI starts one)"
)]
async fn postgres_storage_keeps_the_contract() {
    #[cfg(granary_postgres)]
    {
        let storage = granary_actors::PostgresStorage::connect(POSTGRES)
            .await
            .unwrap();
        let namespace = format!("account-{}", uuid::Uuid::new_v4());
        contract_in(&storage, &namespace).await;
        // Two stores on one database see each other's writes and conflicts.
        let other = granary_actors::PostgresStorage::connect(POSTGRES)
            .await
            .unwrap();
        let grain = id_in(&namespace, "shared");
        let first = storage.write(&grain, b"one", None).await.unwrap();
        assert!(matches!(
            other.write(&grain, b"two", None).await,
            Err(StorageError::Conflict { actual: Some(actual), .. }) if actual == first
        ));
        storage.clear(&grain, Some(first)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(granary_postgres),
    ignore = "set GRANARY_POSTGRES_URL to a PostgreSQL server (CI starts one)"
)]
async fn silos_that_connect_at_once_to_a_fresh_database_all_start() {
    #[cfg(granary_postgres)]
    {
        // A schema of this test's own, empty, where the tables do not
        // exist yet: every store's connection looks there first.
        let schema = format!("granary_race_{}", uuid::Uuid::new_v4().simple());
        let (admin, connection) = tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls)
            .await
            .expect("the server answers");
        tokio::spawn(connection);
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let separator = if POSTGRES.contains('?') { '&' } else { '?' };
        let url = format!("{POSTGRES}{separator}options=-c%20search_path%3D{schema}");
        let stores = futures_util::future::join_all(
            (0..8).map(|_| granary_actors::PostgresStorage::connect(&url)),
        )
        .await;
        let failed: Vec<String> = stores
            .iter()
            .filter_map(|store| store.as_ref().err().map(ToString::to_string))
            .collect();
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
        assert!(failed.is_empty(), "some silos did not start: {failed:?}");
    }
}

#[tokio::test]
#[cfg_attr(
    not(granary_postgres),
    ignore = "set GRANARY_POSTGRES_URL to a PostgreSQL server (CI starts one)"
)]
async fn postgres_reminder_table_keeps_the_contract() {
    #[cfg(granary_postgres)]
    {
        let storage = granary_actors::PostgresStorage::connect(POSTGRES)
            .await
            .unwrap();
        // The database outlives the test: a type name of its own each run,
        // and every row it writes deleted again.
        let namespace = format!("alarm-{}", uuid::Uuid::new_v4());
        reminder_contract(&storage, &namespace).await;
        let other = granary_actors::PostgresStorage::connect(POSTGRES)
            .await
            .unwrap();
        let (mine, theirs) = (
            storage.reminder_table().unwrap(),
            other.reminder_table().unwrap(),
        );
        let grain = id_in(&namespace, "shared");
        let etag = mine.upsert(&grain, "wake", 10, 100).await.unwrap();
        let moved = theirs.update_due(&grain, "wake", 110, etag).await.unwrap();
        assert!(matches!(
            mine.update_due(&grain, "wake", 120, etag).await,
            Err(StorageError::Conflict { actual: Some(actual), .. }) if actual == moved
        ));
        assert_eq!(mine.delete(&grain, "wake").await.unwrap(), Some(moved));
    }
}

#[tokio::test]
async fn an_unreachable_postgres_server_is_a_typed_error() {
    // Nothing listens on port 1.
    let refused =
        granary_actors::PostgresStorage::connect("postgres://nobody@127.0.0.1:1/none").await;
    assert!(matches!(refused, Err(StorageError::Backend(_))));
}

/// A TCP relay to the PostgreSQL server that can cut every connection it
/// carries and refuse new ones, as a server restart does to its clients.
#[cfg(granary_postgres)]
struct Relay {
    address: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

#[cfg(granary_postgres)]
impl Relay {
    async fn to(server: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port on loopback for the relay");
        let address = listener.local_addr().expect("the relay's address");
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (accepting, cuts) = (open.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(server).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Relay { address, open, cut }
    }

    /// Cuts every connection, and refuses new ones until `reopen`.
    fn cut_and_close(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn reopen(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
#[cfg_attr(
    not(granary_postgres),
    ignore = "set GRANARY_POSTGRES_URL to a PostgreSQL server (CI starts one)"
)]
async fn postgres_storage_serves_again_once_its_server_is_back() {
    #[cfg(granary_postgres)]
    {
        let config: tokio_postgres::Config = POSTGRES.parse().expect("GRANARY_POSTGRES_URL parses");
        let (Some(tokio_postgres::config::Host::Tcp(host)), Some(port)) =
            (config.get_hosts().first(), config.get_ports().first())
        else {
            panic!("GRANARY_POSTGRES_URL must name a TCP host and port for this test");
        };
        let server = tokio::net::lookup_host((host.as_str(), *port))
            .await
            .expect("the PostgreSQL host resolves")
            .next()
            .expect("the PostgreSQL host has an address");
        let relay = Relay::to(server).await;
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let url = format!(
            "postgres://{}:{}@{}/{}?connect_timeout=2",
            config.get_user().unwrap_or("postgres"),
            password,
            relay.address,
            config.get_dbname().unwrap_or("postgres"),
        );
        let storage = granary_actors::PostgresStorage::connect(&url)
            .await
            .expect("connect through the relay");
        let grain = id_in(&format!("restart-{}", uuid::Uuid::new_v4()), "one");
        let first = storage
            .write(&grain, b"before", None)
            .await
            .expect("a write before the cut");

        // The server goes away: operations fail with a typed error, promptly.
        relay.cut_and_close();
        let down = std::time::Instant::now();
        for _ in 0..3 {
            let answer =
                tokio::time::timeout(std::time::Duration::from_secs(10), storage.read(&grain))
                    .await
                    .expect("an operation on a lost server answers within its connect timeout");
            assert!(
                matches!(answer, Err(StorageError::Backend(_))),
                "a read with the server gone: {answer:?}"
            );
        }
        assert!(down.elapsed() < std::time::Duration::from_secs(10));

        // It is back: the next operations open a new connection and see
        // what was written before.
        relay.reopen();
        let back = std::time::Instant::now();
        let stored = loop {
            match storage.read(&grain).await {
                Ok(stored) => break stored,
                Err(err) => {
                    assert!(
                        back.elapsed() < std::time::Duration::from_secs(10),
                        "the store did not serve again once the server was back: {err}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        };
        assert_eq!(
            stored.map(|s| (s.data, s.etag)),
            Some((b"before".to_vec(), first))
        );
        let second = storage
            .write(&grain, b"after", Some(first))
            .await
            .expect("a write on the new connection");
        storage
            .clear(&grain, Some(second))
            .await
            .expect("clearing the test's row");
    }
}

#[tokio::test]
async fn a_postgres_server_that_accepts_and_never_answers_fails_the_connect_in_time() {
    // Accepts, holds the socket, says nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port on loopback");
    let address = listener.local_addr().expect("its address");
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let began = std::time::Instant::now();
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        granary_actors::PostgresStorage::connect(&format!(
            "postgres://nobody@{address}/none?connect_timeout=1"
        )),
    )
    .await
    .expect("the connect gives up by itself, within its connect timeout");
    assert!(
        matches!(&refused, Err(StorageError::Backend(why)) if why.contains("no connection within")),
        "{refused:?}"
    );
    assert!(began.elapsed() < std::time::Duration::from_secs(5));
    held.abort();
}

/// Contract rule 5: rows that cannot be decoded (a garbled grain key, a
/// truncated value) are skipped by reads, the others load, and `delete`
/// removes a bad row all the same. Before, one bad row failed every read
/// (no stored reminder loaded on any silo) and could not be deleted.
#[tokio::test]
async fn redb_skips_a_reminder_row_it_cannot_read_and_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reminders.redb");
    let truncated = GrainId {
        type_name: "alarm".into(),
        key: GrainKey::from("truncated"),
    };
    {
        // Written as other tooling (or damage) might leave them.
        let table = redb::TableDefinition::<&[u8], &[u8]>::new("granary_reminders");
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut rows = txn.open_table(table).unwrap();
            let key =
                postcard::to_extend("bad", postcard::to_allocvec(&truncated).unwrap()).unwrap();
            rows.insert(key.as_slice(), [1u8, 2, 3].as_slice()).unwrap();
            rows.insert([0xffu8; 3].as_slice(), [0u8; 24].as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let storage = RedbStorage::open(&path).unwrap();
    let table = storage.reminder_table().unwrap();
    let good = id_in("alarm", "good");
    let etag = table.upsert(&good, "wake", 10, 20).await.unwrap();
    let expected = vec![ReminderRow {
        grain: good.clone(),
        name: "wake".into(),
        period_ms: 10,
        next_due_ms: 20,
        etag,
    }];
    assert_eq!(table.read_all().await.unwrap(), expected);
    assert_eq!(table.read_grain(&truncated).await.unwrap(), vec![]);
    assert_eq!(table.delete(&truncated, "bad").await.unwrap(), Some(0));
    assert_eq!(table.delete(&truncated, "bad").await.unwrap(), None);
    assert_eq!(table.read_all().await.unwrap(), expected);
}

/// Contract rule 5 on SQLite: a garbled grain key and a negative period
/// (written by SQL tooling) are skipped; the other rows load.
#[tokio::test]
async fn sqlite_skips_a_reminder_row_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reminders.sqlite");
    let storage = SqliteStorage::open(&path).unwrap();
    let table = storage.reminder_table().unwrap();
    let (good, negative) = (id_in("alarm", "good"), id_in("alarm", "negative"));
    let etag = table.upsert(&good, "wake", 10, 20).await.unwrap();
    table.upsert(&negative, "bad", 10, 20).await.unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        "UPDATE granary_reminders SET period_ms = -5, etag = -3 WHERE name = 'bad'",
        [],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO granary_reminders VALUES ('alarm', X'FFFF', 'garbled', 10, 20, 1)",
        [],
    )
    .unwrap();
    let expected = vec![ReminderRow {
        grain: good.clone(),
        name: "wake".into(),
        period_ms: 10,
        next_due_ms: 20,
        etag,
    }];
    assert_eq!(table.read_all().await.unwrap(), expected);
    assert_eq!(table.read_grain(&negative).await.unwrap(), vec![]);
    // Its ETag unreadable too: deleted all the same, reported as ETag 0.
    assert_eq!(table.delete(&negative, "bad").await.unwrap(), Some(0));
    assert_eq!(table.delete(&negative, "bad").await.unwrap(), None);
}

/// Contract rule 5 on PostgreSQL.
#[tokio::test]
#[cfg_attr(
    not(granary_postgres),
    ignore = "set GRANARY_POSTGRES_URL to a PostgreSQL server (CI starts one)"
)]
async fn postgres_skips_a_reminder_row_it_cannot_read() {
    #[cfg(granary_postgres)]
    {
        let storage = granary_actors::PostgresStorage::connect(POSTGRES)
            .await
            .unwrap();
        let table = storage.reminder_table().unwrap();
        let namespace = format!("alarm-{}", uuid::Uuid::new_v4());
        let (good, negative) = (id_in(&namespace, "good"), id_in(&namespace, "negative"));
        let etag = table.upsert(&good, "wake", 10, 20).await.unwrap();
        table.upsert(&negative, "bad", 10, 20).await.unwrap();
        let (raw, connection) = tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls)
            .await
            .expect("the server answers");
        tokio::spawn(connection);
        raw.execute(
            "UPDATE granary_reminders SET period_ms = -5, etag = -3
             WHERE grain_type = $1 AND name = 'bad'",
            &[&namespace],
        )
        .await
        .unwrap();
        raw.execute(
            "INSERT INTO granary_reminders (grain_type, grain_key, name, period_ms, next_due_ms, etag)
             VALUES ($1, '\\xffff'::bytea, 'garbled', 10, 20, 1)",
            &[&namespace],
        )
        .await
        .unwrap();
        let mine: Vec<ReminderRow> = table
            .read_all()
            .await
            .unwrap()
            .into_iter()
            .filter(|row| row.grain.type_name == namespace)
            .collect();
        assert_eq!(
            mine,
            vec![ReminderRow {
                grain: good.clone(),
                name: "wake".into(),
                period_ms: 10,
                next_due_ms: 20,
                etag,
            }]
        );
        assert_eq!(table.delete(&negative, "bad").await.unwrap(), Some(0));
        assert_eq!(table.delete(&negative, "bad").await.unwrap(), None);
        table.delete(&good, "wake").await.unwrap();
        // A grain state's negative ETag is refused, not taken for 0 (a
        // version no write could ever match).
        let state = id_in(&namespace, "state");
        storage.write(&state, b"one", None).await.unwrap();
        raw.execute(
            "UPDATE granary_grain_state SET etag = -7 WHERE grain_type = $1",
            &[&namespace],
        )
        .await
        .unwrap();
        assert!(
            matches!(
                storage.read(&state).await,
                Err(StorageError::Serialization(_))
            ),
            "a negative ETag was read as a version"
        );
        raw.execute(
            "DELETE FROM granary_grain_state WHERE grain_type = $1",
            &[&namespace],
        )
        .await
        .unwrap();
        raw.execute(
            "DELETE FROM granary_reminders WHERE grain_type = $1",
            &[&namespace],
        )
        .await
        .unwrap();
    }
}

/// A truncated redb state is a decoding failure (`Serialization`), not a
/// `Backend` error that reads as transient.
#[tokio::test]
async fn a_truncated_redb_state_is_a_serialization_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grains.redb");
    let grain = id("truncated");
    {
        let table = redb::TableDefinition::<&[u8], &[u8]>::new("grain_state");
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut states = txn.open_table(table).unwrap();
            let key = postcard::to_allocvec(&grain).unwrap();
            states.insert(key.as_slice(), [1u8, 2].as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let storage = RedbStorage::open(&path).unwrap();
    assert!(matches!(
        storage.read(&grain).await,
        Err(StorageError::Serialization(_))
    ));
}
