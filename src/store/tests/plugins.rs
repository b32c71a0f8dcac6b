//! Plugins (versions, kinds, bytes, deletion while a job uses them) and the store's
//! secrets (see `store/tests.rs`).

use super::*;

async fn plugins_keep_versions_kinds_and_bytes(store: Store) {
    let (p1, new) = store
        .put_plugin(plugin("aa", "seg", PluginKind::Filter), b"one".to_vec().into())
        .await
        .unwrap();
    assert!(new);
    let (_, new) = store
        .put_plugin(plugin("aa", "seg", PluginKind::Filter), b"one".to_vec().into())
        .await
        .unwrap();
    assert!(!new, "the same bytes again");
    store
        .put_plugin(plugin("bb", "seg", PluginKind::Filter), b"two".to_vec().into())
        .await
        .unwrap();
    // The same bytes under a second name share them.
    let (shared, new) = store
        .put_plugin(plugin("aa", "alias", PluginKind::Filter), b"one".to_vec().into())
        .await
        .unwrap();
    assert!(!new);
    assert_eq!(
        (shared.name.as_str(), shared.created_at),
        ("alias", p1.created_at)
    );
    let err = store
        .put_plugin(
            plugin("cc", "seg", PluginKind::Template),
            b"three".to_vec().into(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "a name keeps its kind");
    let err = store
        .put_plugin(plugin("aa", "tpl", PluginKind::Template), b"one".to_vec().into())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "bytes keep their kind");

    assert_eq!(
        store.plugin_by_name("seg".into()).await.unwrap().unwrap().id,
        "bb"
    );
    assert_eq!(
        store
            .plugin_version("seg".into(), "aa".into())
            .await
            .unwrap()
            .unwrap()
            .name,
        "seg"
    );
    assert!(
        store
            .plugin_version("seg".into(), "zz".into())
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.plugin_by_name("nope".into()).await.unwrap().is_none());
    let (kind, versions) = store.plugin_versions("seg".into()).await.unwrap().unwrap();
    assert_eq!(kind, PluginKind::Filter);
    let v: Vec<(u64, &str)> = versions.iter().map(|v| (v.version, v.id.as_str())).collect();
    assert_eq!(v, vec![(1, "aa"), (2, "bb")]);
    let listed: Vec<(String, u64, u64)> = store
        .list_plugins()
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.latest.version, p.versions))
        .collect();
    assert_eq!(listed, vec![("alias".into(), 1, 1), ("seg".into(), 2, 2)]);
    assert_eq!(store.plugin_bytes("bb".into()).await.unwrap(), b"two");

    // Deleting a name keeps bytes another name uses.
    store.delete_plugin("seg".into()).await.unwrap();
    assert!(store.plugin_by_name("seg".into()).await.unwrap().is_none());
    assert_eq!(store.plugin_bytes("aa".into()).await.unwrap(), b"one");
    assert!(matches!(
        store.plugin_bytes("bb".into()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_plugin("seg".into()).await,
        Err(StoreError::NotFound { .. })
    ));
    // Re-uploading starts the history again.
    store
        .put_plugin(plugin("bb", "seg", PluginKind::Filter), b"two".to_vec().into())
        .await
        .unwrap();
    let (_, versions) = store.plugin_versions("seg".into()).await.unwrap().unwrap();
    assert_eq!(versions.len(), 1);
}

async fn a_plugin_in_use_by_an_unfinished_job_cannot_be_deleted(store: Store) {
    store
        .put_plugin(
            plugin("aa", "default-filter", PluginKind::Filter),
            b"f".to_vec().into(),
        )
        .await
        .unwrap();
    let (_, job) = job_with(&store, 1).await;
    let err = store.delete_plugin("default-filter".into()).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains(&job.id.to_string())),
        "{err:?}"
    );
    store
        .update_job(job.id, |j| j.state = JobState::Completed)
        .await
        .unwrap();
    store.delete_plugin("default-filter".into()).await.unwrap();
}

async fn secrets_are_kept_once(store: Store) {
    let (first, stored) = store.secret("s", b"one".to_vec()).await.unwrap();
    assert!(stored);
    assert_eq!(first, b"one");
    let (again, stored) = store.secret("s", b"two".to_vec()).await.unwrap();
    assert!(!stored);
    assert_eq!(again, b"one");
    store.ping().await.unwrap();
}

conformance!(
    plugins_keep_versions_kinds_and_bytes,
    a_plugin_in_use_by_an_unfinished_job_cannot_be_deleted,
    secrets_are_kept_once,
);
