//! Plugin storage: component bytes by sha256, metadata, and each name's version history.

use redb::{ReadTransaction, ReadableTable, WriteTransaction};

use super::tables::*;
use super::{RedbStore, decode, encode};
use crate::domain::*;
use crate::store::{Plugins, StoreError};

fn plugin_in(txn: &ReadTransaction, id: &str) -> Result<Plugin, StoreError> {
    let table = txn.open_table(PLUGINS)?;
    let row = table
        .get(id)?
        .ok_or_else(|| StoreError::not_found("plugin", id))?;
    decode(row.value())
}

/// A name's versions, oldest first.
fn versions_of(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    name: &str,
) -> Result<Vec<PluginVersion>, StoreError> {
    let mut out = Vec::new();
    for row in table.range((name, 0)..=(name, u64::MAX))? {
        out.push(decode(row?.1.value())?);
    }
    Ok(out)
}

#[async_trait::async_trait]
impl Plugins for RedbStore {
    /// Stores a plugin and makes it the latest version of its name. Storing bytes that
    /// are already the name's latest version is idempotent. Returns the plugin and
    /// whether these bytes were new to the store.
    async fn put_plugin(&self, plugin: Plugin, bytes: bytes::Bytes) -> Result<(Plugin, bool), StoreError> {
        self.write(move |txn| {
            let mut metas = txn.open_table(PLUGINS)?;
            let mut names = txn.open_table(PLUGIN_NAMES)?;
            let stored: Option<Plugin> = metas
                .get(plugin.id.as_str())?
                .map(|v| decode(v.value()))
                .transpose()?;
            if let Some(stored) = &stored
                && stored.kind != plugin.kind
            {
                return Err(StoreError::Conflict(format!(
                    "these bytes are already stored as {} plugin {:?}",
                    stored.kind, stored.name
                )));
            }
            let latest_id = names.get(plugin.name.as_str())?.map(|v| v.value().to_string());
            let latest: Option<Plugin> = match &latest_id {
                Some(id) => metas.get(id.as_str())?.map(|v| decode(v.value())).transpose()?,
                None => None,
            };
            if let Some(latest) = latest
                && latest.kind != plugin.kind
            {
                return Err(StoreError::Conflict(format!(
                    "plugin name {:?} belongs to a {} policy",
                    plugin.name, latest.kind
                )));
            }
            if latest_id.as_deref() != Some(plugin.id.as_str()) {
                let mut versions = txn.open_table(PLUGIN_VERSIONS)?;
                let last = versions_of(&versions, &plugin.name)?
                    .last()
                    .map_or(0, |v| v.version);
                let version = PluginVersion {
                    version: last + 1,
                    id: plugin.id.clone(),
                    size: plugin.size,
                    uploaded_at: now(),
                };
                versions.insert(
                    (plugin.name.as_str(), version.version),
                    encode(&version).as_slice(),
                )?;
                names.insert(plugin.name.as_str(), plugin.id.as_str())?;
            }
            match stored {
                // Same bytes again: keep the first upload's record, under the name asked for.
                Some(stored) => Ok((
                    Plugin {
                        name: plugin.name,
                        ..stored
                    },
                    false,
                )),
                None => {
                    metas.insert(plugin.id.as_str(), encode(&plugin).as_slice())?;
                    txn.open_table(PLUGIN_BLOBS)?
                        .insert(plugin.id.as_str(), &bytes[..])?;
                    Ok((plugin, true))
                }
            }
        })
        .await
    }

    /// The latest version of the plugin called `name`, if any.
    async fn plugin_by_name(&self, name: String) -> Result<Option<Plugin>, StoreError> {
        self.read(move |txn| {
            let names = txn.open_table(PLUGIN_NAMES)?;
            let Some(id) = names.get(name.as_str())?.map(|v| v.value().to_string()) else {
                return Ok(None);
            };
            plugin_in(txn, &id).map(|p| Some(Plugin { name, ..p }))
        })
        .await
    }

    /// Version `id` of the plugin called `name`, if it is one of that name's versions.
    async fn plugin_version(&self, name: String, id: String) -> Result<Option<Plugin>, StoreError> {
        self.read(move |txn| {
            let versions = txn.open_table(PLUGIN_VERSIONS)?;
            if !versions_of(&versions, &name)?.iter().any(|v| v.id == id) {
                return Ok(None);
            }
            plugin_in(txn, &id).map(|p| Some(Plugin { name, ..p }))
        })
        .await
    }

    /// Every plugin name with its latest version.
    async fn list_plugins(&self) -> Result<Vec<PluginSummary>, StoreError> {
        self.read(|txn| {
            let names = txn.open_table(PLUGIN_NAMES)?;
            let versions = txn.open_table(PLUGIN_VERSIONS)?;
            let mut out = Vec::new();
            for row in names.iter()? {
                let (name, id) = row?;
                let (name, id) = (name.value().to_string(), id.value().to_string());
                let history = versions_of(&versions, &name)?;
                let plugin = plugin_in(txn, &id)?;
                let latest = history
                    .iter()
                    .rev()
                    .find(|v| v.id == id)
                    .cloned()
                    .ok_or_else(|| {
                        StoreError::Inconsistent(format!("plugin {name:?} has no version {id}"))
                    })?;
                out.push(PluginSummary {
                    name,
                    kind: plugin.kind,
                    latest,
                    versions: history.len() as u64,
                });
            }
            Ok(out)
        })
        .await
    }

    /// A plugin name's kind and versions, oldest first; `None` for an unknown name.
    async fn plugin_versions(
        &self,
        name: String,
    ) -> Result<Option<(PluginKind, Vec<PluginVersion>)>, StoreError> {
        self.read(move |txn| {
            let versions = versions_of(&txn.open_table(PLUGIN_VERSIONS)?, &name)?;
            let Some(first) = versions.first() else {
                return Ok(None);
            };
            let kind = plugin_in(txn, &first.id)?.kind;
            Ok(Some((kind, versions)))
        })
        .await
    }

    /// Deletes a plugin name and all its versions, and the bytes no other name uses.
    /// Refused while an unfinished job uses one of its versions.
    async fn delete_plugin(&self, name: String) -> Result<(), StoreError> {
        self.write(move |txn| delete_plugin_in(txn, &name)).await
    }

    /// A plugin's component bytes.
    async fn plugin_bytes(&self, id: String) -> Result<Vec<u8>, StoreError> {
        self.read(move |txn| {
            let table = txn.open_table(PLUGIN_BLOBS)?;
            let row = table
                .get(id.as_str())?
                .ok_or_else(|| StoreError::not_found("plugin", &id))?;
            Ok(row.value().to_vec())
        })
        .await
    }
}

fn delete_plugin_in(txn: &WriteTransaction, name: &str) -> Result<(), StoreError> {
    let mut versions = txn.open_table(PLUGIN_VERSIONS)?;
    let history = versions_of(&versions, name)?;
    if history.is_empty() {
        return Err(StoreError::not_found("plugin", name));
    }
    let jobs = txn.open_table(JOBS)?;
    for row in jobs.iter()? {
        let job: Job = decode(row?.1.value())?;
        if !job.state.is_finished() && (job.filter.name == name || job.template.name == name) {
            return Err(StoreError::Conflict(format!(
                "plugin {name:?} is used by job {}, which is {:?}; wait for it to finish",
                job.id, job.state
            )));
        }
    }
    drop(jobs);
    // Ids still used by other names keep their bytes.
    let mut kept = std::collections::HashSet::new();
    for row in versions.iter()? {
        let (key, value) = row?;
        if key.value().0 != name {
            kept.insert(decode::<PluginVersion>(value.value())?.id);
        }
    }
    for version in &history {
        versions.remove((name, version.version))?;
    }
    txn.open_table(PLUGIN_NAMES)?.remove(name)?;
    let mut metas = txn.open_table(PLUGINS)?;
    let mut blobs = txn.open_table(PLUGIN_BLOBS)?;
    for version in history {
        if !kept.contains(&version.id) {
            metas.remove(version.id.as_str())?;
            blobs.remove(version.id.as_str())?;
        }
    }
    Ok(())
}
