//! Nodes and leases in PostgreSQL: the `nodes` table, heartbeats by the database's
//! clock, and the rescue of what a dead node held.

use std::collections::BTreeMap;
use std::time::Duration;

use super::jobs::{Delta, apply_counts};
use super::{PgStore, commit, domain_int, execute, query, sql_int};
use crate::domain::*;
use crate::store::{Fleet, NodeInfo, Rescued, StoreError};

fn interval_ms(lease: Duration) -> f64 {
    lease.as_secs_f64() * 1000.0
}

#[async_trait::async_trait]
impl Fleet for PgStore {
    fn is_shared(&self) -> bool {
        true
    }

    async fn register_node(&self, node: &NodeInfo, lease: Duration) -> Result<Rescued, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        execute(
            &tx,
            "INSERT INTO nodes (id, address, version, started_at, lease_until)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8 / 1000))",
            &[
                &node.id,
                &node.address,
                &node.version,
                &sql_int(now()),
                &interval_ms(lease),
            ],
        )
        .await?;
        commit(tx).await?;
        self.rescue().await
    }

    async fn heartbeat(&self, node: &str, lease: Duration) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let renewed = execute(
            &tx,
            "UPDATE nodes SET heartbeat_at = now(), lease_until = now() + make_interval(secs => $2::float8 / 1000)
             WHERE id = $1",
            &[&node, &interval_ms(lease)],
        )
        .await?;
        commit(tx).await?;
        if renewed == 0 {
            return Err(StoreError::TakenOver(format!(
                "node {node} was declared dead (its lease expired) and its claims given to other nodes"
            )));
        }
        Ok(())
    }

    async fn rescue(&self) -> Result<Rescued, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // A node frozen inside a transaction holds its rows until the server ends its
        // session (`IDLE_IN_TRANSACTION`); waiting for them here would stop this node's
        // own heartbeat. Give up after a second instead: the next heartbeat tries again.
        execute(&tx, "SET LOCAL lock_timeout = '1s'", &[]).await?;
        // Deleting the node and requeueing its claims in one transaction: a node is
        // either alive with its claims or gone without them.
        let dead: Vec<String> = query(
            &tx,
            "DELETE FROM nodes WHERE lease_until < now() RETURNING id",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
        if dead.is_empty() {
            return Ok(Rescued::default());
        }
        // Their claims become pending behind where this node's claims look next.
        self.claim_hints.forget_all();
        let pending = serde_json::to_value(DeliveryState::Pending)?;
        let rows = query(
            &tx,
            "UPDATE deliveries SET state = 0, detail = $2, claimed_by = NULL
             WHERE state = 1 AND claimed_by = ANY($1)
             RETURNING job_id",
            &[&dead, &pending],
        )
        .await?;
        let mut per_job: BTreeMap<u64, u64> = BTreeMap::new();
        for row in &rows {
            *per_job.entry(domain_int(row.get(0))).or_default() += 1;
        }
        // Jobs in id order: every transaction locks jobs in the same order.
        for (&job_id, &n) in &per_job {
            let mut delta = Delta::default();
            delta.moved(StateKind::Sending, StateKind::Pending, n as i64);
            apply_counts(&tx, job_id, &delta, n as i64).await?;
        }
        commit(tx).await?;
        Ok(Rescued {
            nodes: dead,
            requeued: per_job.into_iter().collect(),
        })
    }

    /// Expires the node's lease and rescues at once: what it still held (deliveries the
    /// drain gave up on) goes back to pending, counted as re-sent.
    async fn leave(&self, node: &str) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        execute(
            &tx,
            "UPDATE nodes SET lease_until = '-infinity' WHERE id = $1",
            &[&node],
        )
        .await?;
        commit(tx).await?;
        self.rescue().await.map(|_| ())
    }

    async fn take_tokens(
        &self,
        bucket: &str,
        per_second: f64,
        burst: f64,
        want: u32,
    ) -> Result<(u32, Duration), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // A new bucket starts with one token, not a full burst.
        execute(
            &tx,
            "INSERT INTO rate_buckets (name, tokens, updated_at) VALUES ($1, 1, clock_timestamp())
             ON CONFLICT (name) DO NOTHING",
            &[&bucket],
        )
        .await?;
        let rows = query(
            &tx,
            "WITH b AS (
                 SELECT name, least($3::float8, tokens + extract(epoch FROM clock_timestamp() - updated_at)::float8 * $2::float8) AS available
                 FROM rate_buckets WHERE name = $1 FOR UPDATE
             )
             UPDATE rate_buckets r
                SET tokens = b.available - least(floor(b.available), $4::float8), updated_at = clock_timestamp()
             FROM b WHERE r.name = b.name
             RETURNING least(floor(b.available), $4::float8), b.available",
            &[&bucket, &per_second, &burst, &f64::from(want)],
        )
        .await?;
        commit(tx).await?;
        let (granted, available): (f64, f64) = rows
            .first()
            .map(|row| (row.get(0), row.get(1)))
            .ok_or_else(|| StoreError::Inconsistent(format!("rate bucket {bucket} vanished")))?;
        let granted = granted.max(0.0) as u32;
        let wait = if granted > 0 || per_second <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(((1.0 - available) / per_second).clamp(0.001, 3600.0))
        };
        Ok((granted, wait))
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT n.id, n.address, n.version, n.started_at,
                    (extract(epoch FROM now() - n.heartbeat_at) * 1000)::bigint,
                    (SELECT count(*) FROM deliveries d WHERE d.state = 1 AND d.claimed_by = n.id)
             FROM nodes n ORDER BY n.id",
            &[],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|row| NodeInfo {
                id: row.get(0),
                address: row.get(1),
                version: row.get(2),
                started_at: domain_int(row.get(3)),
                heartbeat_age_ms: domain_int(row.get(4)),
                claims: domain_int(row.get(5)),
            })
            .collect())
    }
}
