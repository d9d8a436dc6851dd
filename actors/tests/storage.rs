//! Every storage provider against the same contract: ETag concurrency,
//! clear, versions never reused; redb across reopening and across a silo
//! restart.

use granary_actors::{
    GrainId, GrainKey, MemoryStorage, RedbStorage, SqliteStorage, StorageError, StorageProvider,
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

#[tokio::test]
async fn memory_storage_keeps_the_contract() {
    contract(&MemoryStorage::new()).await;
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
    }
}

#[tokio::test]
async fn an_unreachable_postgres_server_is_a_typed_error() {
    // Nothing listens on port 1.
    let refused =
        granary_actors::PostgresStorage::connect("postgres://nobody@127.0.0.1:1/none").await;
    assert!(matches!(refused, Err(StorageError::Backend(_))));
}
