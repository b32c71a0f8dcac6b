//! Plugin storage in PostgreSQL: component bytes by sha256, and each name's versions.
//! Changes to one name are serialised by an advisory lock on the name, so two nodes
//! uploading under one name at once number their versions 1, 2, not 1, 1.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::{PgStore, commit, domain_int, execute, query, query_opt, sql_int};
use crate::domain::*;
use crate::store::{Plugins, StoreError};

fn kind_of(text: &str) -> Result<PluginKind, StoreError> {
    match text {
        "filter" => Ok(PluginKind::Filter),
        "template" => Ok(PluginKind::Template),
        "automation" => Ok(PluginKind::Automation),
        other => Err(StoreError::Inconsistent(format!("unknown plugin kind {other:?}"))),
    }
}

/// A row of `id, kind, name, size, created_at` from `plugin_blobs`.
pub(super) fn plugin(row: &Row) -> Result<Plugin, StoreError> {
    Ok(Plugin {
        id: row.get(0),
        kind: kind_of(row.get(1))?,
        name: row.get(2),
        size: domain_int(row.get(3)),
        created_at: domain_int(row.get(4)),
    })
}

pub(super) fn version(row: &Row) -> PluginVersion {
    PluginVersion {
        version: domain_int(row.get(0)),
        id: row.get(1),
        size: domain_int(row.get(2)),
        uploaded_at: domain_int(row.get(3)),
    }
}

async fn blob(tx: &impl GenericClient, id: &str) -> Result<Option<Plugin>, StoreError> {
    let row = query_opt(
        tx,
        "SELECT id, kind, name, size, created_at FROM plugin_blobs WHERE id = $1",
        &[&id],
    )
    .await?;
    row.as_ref().map(plugin).transpose()
}

async fn lock_name(tx: &impl GenericClient, name: &str) -> Result<(), StoreError> {
    execute(
        tx,
        "SELECT pg_advisory_xact_lock(hashtextextended('plugin:' || $1, 0))",
        &[&name],
    )
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl Plugins for PgStore {
    async fn put_plugin(&self, plugin: Plugin, bytes: bytes::Bytes) -> Result<(Plugin, bool), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        lock_name(&tx, &plugin.name).await?;
        let stored = blob(&tx, &plugin.id).await?;
        if let Some(stored) = &stored
            && stored.kind != plugin.kind
        {
            return Err(StoreError::Conflict(format!(
                "these bytes are already stored as {} plugin {:?}",
                stored.kind, stored.name
            )));
        }
        let latest = query_opt(
            &tx,
            "SELECT b.id, b.kind FROM plugin_names n JOIN plugin_blobs b ON b.id = n.id WHERE n.name = $1",
            &[&plugin.name],
        )
        .await?;
        if let Some(latest) = &latest {
            let kind = kind_of(latest.get(1))?;
            if kind != plugin.kind {
                return Err(StoreError::Conflict(format!(
                    "plugin name {:?} belongs to a {kind} policy",
                    plugin.name
                )));
            }
        }
        let fresh = stored.is_none();
        if fresh {
            // Two names uploading the same bytes at once: the second finds them stored.
            execute(
                &tx,
                "INSERT INTO plugin_blobs (id, kind, name, size, created_at, bytes) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO NOTHING",
                &[
                    &plugin.id,
                    &plugin.kind.as_str(),
                    &plugin.name,
                    &sql_int(plugin.size),
                    &sql_int(plugin.created_at),
                    &&bytes[..],
                ],
            )
            .await?;
        }
        let latest_id: Option<String> = latest.map(|row| row.get(0));
        if latest_id.as_deref() != Some(plugin.id.as_str()) {
            execute(
                &tx,
                "INSERT INTO plugin_versions (name, version, id, size, uploaded_at)
                 SELECT $1, coalesce(max(version), 0) + 1, $2, $3, $4 FROM plugin_versions WHERE name = $1",
                &[&plugin.name, &plugin.id, &sql_int(plugin.size), &sql_int(now())],
            )
            .await?;
            execute(
                &tx,
                "INSERT INTO plugin_names (name, id) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET id = $2",
                &[&plugin.name, &plugin.id],
            )
            .await?;
        }
        commit(tx).await?;
        Ok(match stored {
            // Same bytes again: keep the first upload's record, under the name asked for.
            Some(stored) => (
                Plugin {
                    name: plugin.name,
                    ..stored
                },
                false,
            ),
            None => (plugin, fresh),
        })
    }

    async fn plugin_by_name(&self, name: String) -> Result<Option<Plugin>, StoreError> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT b.id, b.kind, b.name, b.size, b.created_at
             FROM plugin_names n JOIN plugin_blobs b ON b.id = n.id WHERE n.name = $1",
            &[&name],
        )
        .await?;
        Ok(row
            .as_ref()
            .map(plugin)
            .transpose()?
            .map(|p| Plugin { name, ..p }))
    }

    async fn plugin_version(&self, name: String, id: String) -> Result<Option<Plugin>, StoreError> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT b.id, b.kind, b.name, b.size, b.created_at FROM plugin_blobs b
             WHERE b.id = $2 AND EXISTS (SELECT 1 FROM plugin_versions v WHERE v.name = $1 AND v.id = $2)",
            &[&name, &id],
        )
        .await?;
        Ok(row
            .as_ref()
            .map(plugin)
            .transpose()?
            .map(|p| Plugin { name, ..p }))
    }

    async fn list_plugins(&self) -> Result<Vec<PluginSummary>, StoreError> {
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT n.name, b.kind, v.version, v.id, v.size, v.uploaded_at,
                    (SELECT count(*) FROM plugin_versions c WHERE c.name = n.name)
             FROM plugin_names n
             JOIN plugin_blobs b ON b.id = n.id
             JOIN LATERAL (
                 SELECT version, id, size, uploaded_at FROM plugin_versions v
                 WHERE v.name = n.name AND v.id = n.id ORDER BY version DESC LIMIT 1
             ) v ON true
             ORDER BY n.name",
            &[],
        )
        .await?;
        rows.iter()
            .map(|row| {
                Ok(PluginSummary {
                    name: row.get(0),
                    kind: kind_of(row.get(1))?,
                    latest: PluginVersion {
                        version: domain_int(row.get(2)),
                        id: row.get(3),
                        size: domain_int(row.get(4)),
                        uploaded_at: domain_int(row.get(5)),
                    },
                    versions: domain_int(row.get(6)),
                })
            })
            .collect()
    }

    async fn plugin_versions(
        &self,
        name: String,
    ) -> Result<Option<(PluginKind, Vec<PluginVersion>)>, StoreError> {
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT v.version, v.id, v.size, v.uploaded_at, b.kind
             FROM plugin_versions v JOIN plugin_blobs b ON b.id = v.id
             WHERE v.name = $1 ORDER BY v.version",
            &[&name],
        )
        .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let kind = kind_of(first.get(4))?;
        Ok(Some((kind, rows.iter().map(version).collect())))
    }

    async fn delete_plugin(&self, name: String) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        lock_name(&tx, &name).await?;
        let ids: Vec<String> = query(&tx, "SELECT id FROM plugin_versions WHERE name = $1", &[&name])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if ids.is_empty() {
            return Err(StoreError::not_found("plugin", &name));
        }
        let user = query_opt(
            &tx,
            "SELECT id, state FROM jobs
             WHERE state NOT IN ('completed', 'cancelled', 'failed')
               AND (doc -> 'filter' ->> 'name' = $1 OR doc -> 'template' ->> 'name' = $1)
             ORDER BY id LIMIT 1",
            &[&name],
        )
        .await?;
        if let Some(user) = user {
            let state: &str = user.get(1);
            let state = JobState::parse(state).map_or(state.to_string(), |s| format!("{s:?}"));
            return Err(StoreError::Conflict(format!(
                "plugin {name:?} is used by job {}, which is {state}; wait for it to finish",
                user.get::<_, i64>(0)
            )));
        }
        execute(&tx, "DELETE FROM plugin_names WHERE name = $1", &[&name]).await?;
        execute(&tx, "DELETE FROM plugin_versions WHERE name = $1", &[&name]).await?;
        // Bytes still used by another name stay.
        execute(
            &tx,
            "DELETE FROM plugin_blobs b WHERE b.id = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM plugin_versions v WHERE v.id = b.id)",
            &[&ids],
        )
        .await?;
        commit(tx).await?;
        Ok(())
    }

    async fn plugin_bytes(&self, id: String) -> Result<Vec<u8>, StoreError> {
        let client = self.client().await?;
        let row = query_opt(&client, "SELECT bytes FROM plugin_blobs WHERE id = $1", &[&id])
            .await?
            .ok_or_else(|| StoreError::not_found("plugin", &id))?;
        Ok(row.get(0))
    }
}
