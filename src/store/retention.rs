//! Retention: which stored objects have outlived their tenant's policy, and
//! the sweeper that deletes them.
//!
//! Owns the selection rule ([`expired`], a pure function of time, items and
//! policies), the items it judges ([`RetentionItem`], plain data) and its
//! application ([`Sweeper`]: files through an injected deleter, rows and
//! audit through a [`RetentionStore`], which `db::Store` implements). Must not
//! read the clock (time is a parameter, so tests run in virtual days), import
//! the database (it is given items, not rows) nor decide anything about keys
//! or file formats.
//!
//! Boundary rule: an item created at `t` (unix ms) with a policy of `d` days
//! expires when `now >= t + d * 86_400_000`; one millisecond earlier it is
//! kept. `d = 0` therefore means "delete at the first sweep". Legal hold
//! exempts an item whatever its age. An item whose tenant has no policy is
//! kept and reported: missing configuration never deletes data.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::time::UnixMs;

/// One day in milliseconds.
pub const DAY_MS: i64 = 86_400_000;

/// How long a tenant keeps each kind of data, in days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Recordings.
    pub recordings_days: u32,
    /// Transcripts.
    pub transcripts_days: u32,
    /// CDRs / call metadata.
    pub metadata_days: u32,
    /// Audit rows (never shorter than the longest of the others; the
    /// configuration checks it).
    pub audit_days: u32,
}

impl From<&crate::config::Retention> for RetentionPolicy {
    /// A tenant's `[tenant.retention]`.
    fn from(r: &crate::config::Retention) -> Self {
        RetentionPolicy {
            recordings_days: r.recordings_days,
            transcripts_days: r.transcripts_days,
            metadata_days: r.metadata_days,
            audit_days: r.audit_days,
        }
    }
}

impl Default for RetentionPolicy {
    /// 90 days of recordings and transcripts, 365 days of metadata, 400 of audit rows.
    fn default() -> Self {
        Self {
            recordings_days: 90,
            transcripts_days: 90,
            metadata_days: 365,
            audit_days: 400,
        }
    }
}

impl RetentionPolicy {
    /// Days that apply to `kind`, and the policy field's name.
    pub fn days(&self, kind: ItemKind) -> (u32, &'static str) {
        match kind {
            ItemKind::Recording => (self.recordings_days, "recordings_days"),
            ItemKind::Transcript => (self.transcripts_days, "transcripts_days"),
            ItemKind::Call => (self.metadata_days, "metadata_days"),
        }
    }
}

/// What kind of object a retention item is. Ordered as the sweeper deletes:
/// recordings and transcripts before the CDRs that index them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ItemKind {
    /// A recording file and its row.
    Recording,
    /// A transcript segment.
    Transcript,
    /// A CDR.
    Call,
}

/// One object retention may delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionItem {
    /// Kind.
    pub kind: ItemKind,
    /// Recording id, transcript id or call id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Creation time (a call's start).
    pub created_at: UnixMs,
    /// Exempt from retention.
    pub legal_hold: bool,
}

/// Why an item expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryReason {
    /// Policy field that applied (`recordings_days`, ...).
    pub field: &'static str,
    /// Its value.
    pub days: u32,
    /// When the item was created.
    pub created_at: UnixMs,
    /// When it expired (`created_at + days`).
    pub expires_at: UnixMs,
}

impl std::fmt::Display for ExpiryReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}={} elapsed (created at {} ms, expired at {} ms, unix time)",
            self.field, self.days, self.created_at, self.expires_at
        )
    }
}

/// An item past its time, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// The item.
    pub item: RetentionItem,
    /// The rule that expired it.
    pub reason: ExpiryReason,
}

/// The outcome of [`expired`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Items to delete, recordings first, then transcripts, then CDRs; oldest
    /// first within a kind.
    pub expired: Vec<Expiry>,
    /// Items past their time but kept because of a legal hold.
    pub held: Vec<Expiry>,
    /// Tenants without a policy, with how many items were kept for that reason.
    pub unknown_tenants: BTreeMap<String, usize>,
}

/// When an item created at `created_at` expires under `days`.
pub fn expires_at(created_at: UnixMs, days: u32) -> UnixMs {
    created_at.saturating_add(i64::from(days).saturating_mul(DAY_MS))
}

/// Selects the items that have outlived their tenant's policy at `now`.
/// Pure: the same inputs always give the same selection.
pub fn expired(
    now: UnixMs,
    items: &[RetentionItem],
    policy: &dyn Fn(&str) -> Option<RetentionPolicy>,
) -> Selection {
    let mut out = Selection::default();
    let mut policies: BTreeMap<&str, Option<RetentionPolicy>> = BTreeMap::new();
    for item in items {
        let tenant_policy = *policies
            .entry(item.tenant.as_str())
            .or_insert_with(|| policy(&item.tenant));
        let Some(tenant_policy) = tenant_policy else {
            *out.unknown_tenants.entry(item.tenant.clone()).or_insert(0) += 1;
            continue;
        };
        let (days, field) = tenant_policy.days(item.kind);
        let expires = expires_at(item.created_at, days);
        if now < expires {
            continue;
        }
        let expiry = Expiry {
            item: item.clone(),
            reason: ExpiryReason {
                field,
                days,
                created_at: item.created_at,
                expires_at: expires,
            },
        };
        if item.legal_hold {
            out.held.push(expiry);
        } else {
            out.expired.push(expiry);
        }
    }
    let order = |e: &Expiry| (e.item.kind, e.item.created_at, e.item.id.clone());
    out.expired.sort_by_key(order);
    out.held.sort_by_key(order);
    out
}

/// What a sweep did.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Deleted (files and rows), each with an audit row.
    pub deleted: Vec<Expiry>,
    /// Selected but found gone or newly held when applied; nothing done.
    pub skipped: Vec<Expiry>,
    /// A file could not be deleted; its row was kept for the next sweep.
    pub failed: Vec<(Expiry, io::Error)>,
    /// Past their time but under legal hold.
    pub held: Vec<Expiry>,
    /// Tenants without a policy and how many items were kept for that.
    pub unknown_tenants: BTreeMap<String, usize>,
    /// Audit rows deleted under `audit_days`, per tenant (tenants without a
    /// policy keep theirs).
    pub audit_pruned: BTreeMap<String, usize>,
}

/// What the [`Sweeper`] needs from the store it sweeps (`db::Store` is the
/// one): the items to judge, the files behind one, the deletion of its rows
/// and the pruning of audit rows.
pub trait RetentionStore {
    /// The store's error.
    type Error;
    /// Everything retention may delete.
    fn retention_items(&self) -> Result<Vec<RetentionItem>, Self::Error>;
    /// The files behind one expired item: a recording's own file; for a CDR,
    /// every recording file it indexes (including ones already marked
    /// deleted, so a file left behind by an interrupted erasure goes at the
    /// latest with its CDR); none for a transcript.
    fn files_of(&self, item: &RetentionItem) -> Result<Vec<PathBuf>, Self::Error>;
    /// Deletes the rows of one expired item with its audit rows; `false` if
    /// it was already gone or is now held.
    fn delete_expired(&mut self, expiry: &Expiry, now: UnixMs) -> Result<bool, Self::Error>;
    /// The tenants that have audit rows.
    fn audit_tenants(&self) -> Result<Vec<String>, Self::Error>;
    /// Deletes `tenant`'s audit rows older than `before`; returns how many.
    fn prune_audit(&mut self, tenant: &str, before: UnixMs) -> Result<usize, Self::Error>;
}

/// Applies [`expired`] to a [`RetentionStore`]: deletes files through `deleter` first
/// (a file already missing counts as deleted), then the rows with their audit
/// rows. A failed file deletion keeps the row, so the next sweep retries.
pub struct Sweeper<'a> {
    policy: &'a dyn Fn(&str) -> Option<RetentionPolicy>,
    deleter: &'a dyn Fn(&Path) -> io::Result<()>,
}

impl std::fmt::Debug for Sweeper<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeper").finish_non_exhaustive()
    }
}

impl<'a> Sweeper<'a> {
    /// A sweeper with the tenants' policies and a file deleter
    /// (`std::fs::remove_file` in the daemon).
    pub fn new(
        policy: &'a dyn Fn(&str) -> Option<RetentionPolicy>,
        deleter: &'a dyn Fn(&Path) -> io::Result<()>,
    ) -> Self {
        Self { policy, deleter }
    }

    /// What a sweep at `now` would delete, deleting nothing.
    pub fn dry_run<S: RetentionStore>(
        &self,
        store: &S,
        now: UnixMs,
    ) -> Result<Selection, S::Error> {
        Ok(expired(now, &store.retention_items()?, self.policy))
    }

    /// Deletes everything expired at `now`.
    pub fn run<S: RetentionStore>(
        &self,
        store: &mut S,
        now: UnixMs,
    ) -> Result<SweepReport, S::Error> {
        let selection = self.dry_run(store, now)?;
        let mut report = SweepReport {
            held: selection.held,
            unknown_tenants: selection.unknown_tenants,
            ..SweepReport::default()
        };
        for expiry in selection.expired {
            let paths = store.files_of(&expiry.item)?;
            if let Err(e) = self.delete_files(&paths) {
                report.failed.push((expiry, e));
                continue;
            }
            if store.delete_expired(&expiry, now)? {
                report.deleted.push(expiry);
            } else {
                report.skipped.push(expiry);
            }
        }
        // Audit rows last: the deletions above were just audited.
        for tenant in store.audit_tenants()? {
            let Some(policy) = (self.policy)(&tenant) else {
                continue;
            };
            let before = now.saturating_sub(i64::from(policy.audit_days).saturating_mul(DAY_MS));
            let n = store.prune_audit(&tenant, before)?;
            if n > 0 {
                report.audit_pruned.insert(tenant, n);
            }
        }
        Ok(report)
    }

    /// Deletes `paths`; a file already missing counts as deleted.
    fn delete_files(&self, paths: &[PathBuf]) -> io::Result<()> {
        for path in paths {
            match (self.deleter)(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(
        kind: ItemKind,
        id: &str,
        tenant: &str,
        created_at: UnixMs,
        hold: bool,
    ) -> RetentionItem {
        RetentionItem {
            kind,
            id: id.to_owned(),
            tenant: tenant.to_owned(),
            created_at,
            legal_hold: hold,
        }
    }

    fn defaults(_: &str) -> Option<RetentionPolicy> {
        Some(RetentionPolicy::default())
    }

    fn ids(s: &[Expiry]) -> Vec<&str> {
        s.iter().map(|e| e.item.id.as_str()).collect()
    }

    #[test]
    fn boundary_is_inclusive_at_exactly_days() {
        let t = 1_700_000_000_123;
        let items = [item(ItemKind::Recording, "r", "a", t, false)];
        let edge = t + 90 * DAY_MS;
        assert!(expired(edge - 1, &items, &defaults).expired.is_empty());
        let sel = expired(edge, &items, &defaults);
        assert_eq!(ids(&sel.expired), ["r"]);
        assert_eq!(
            sel.expired[0].reason,
            ExpiryReason {
                field: "recordings_days",
                days: 90,
                created_at: t,
                expires_at: edge
            }
        );
    }

    #[test]
    fn each_kind_uses_its_own_days() {
        let policy = |_: &str| {
            Some(RetentionPolicy {
                recordings_days: 1,
                transcripts_days: 2,
                metadata_days: 3,
                audit_days: 400,
            })
        };
        let items = [
            item(ItemKind::Call, "c", "a", 0, false),
            item(ItemKind::Transcript, "t", "a", 0, false),
            item(ItemKind::Recording, "r", "a", 0, false),
        ];
        assert_eq!(ids(&expired(DAY_MS, &items, &policy).expired), ["r"]);
        assert_eq!(
            ids(&expired(2 * DAY_MS, &items, &policy).expired),
            ["r", "t"]
        );
        assert_eq!(
            ids(&expired(3 * DAY_MS, &items, &policy).expired),
            ["r", "t", "c"]
        );
    }

    #[test]
    fn legal_hold_exempts_and_is_reported() {
        let items = [
            item(ItemKind::Recording, "free", "a", 0, false),
            item(ItemKind::Recording, "held", "a", 0, true),
        ];
        let sel = expired(1000 * DAY_MS, &items, &defaults);
        assert_eq!(ids(&sel.expired), ["free"]);
        assert_eq!(ids(&sel.held), ["held"]);
    }

    #[test]
    fn unknown_tenant_is_kept_and_counted() {
        let policy = |t: &str| (t == "known").then(RetentionPolicy::default);
        let items = [
            item(ItemKind::Recording, "k", "known", 0, false),
            item(ItemKind::Recording, "u1", "ghost", 0, false),
            item(ItemKind::Call, "u2", "ghost", 0, false),
        ];
        let sel = expired(i64::MAX, &items, &policy);
        assert_eq!(ids(&sel.expired), ["k"]);
        assert_eq!(
            sel.unknown_tenants,
            BTreeMap::from([("ghost".to_owned(), 2)])
        );
    }

    #[test]
    fn zero_days_expires_at_creation_and_far_future_saturates() {
        let zero = |_: &str| {
            Some(RetentionPolicy {
                recordings_days: 0,
                transcripts_days: u32::MAX,
                metadata_days: u32::MAX,
                audit_days: u32::MAX,
            })
        };
        let items = [
            item(ItemKind::Recording, "r", "a", 5, false),
            item(ItemKind::Transcript, "t", "a", i64::MAX - 1, false),
        ];
        assert!(expired(4, &items, &zero).expired.is_empty());
        assert_eq!(ids(&expired(5, &items, &zero).expired), ["r"]);
        assert_eq!(expires_at(i64::MAX - 1, u32::MAX), i64::MAX);
    }

    #[test]
    fn order_is_kind_then_age_then_id() {
        let items = [
            item(ItemKind::Call, "c1", "a", 0, false),
            item(ItemKind::Recording, "r2", "a", 5, false),
            item(ItemKind::Recording, "r1b", "a", 1, false),
            item(ItemKind::Recording, "r1a", "a", 1, false),
        ];
        assert_eq!(
            ids(&expired(i64::MAX, &items, &defaults).expired),
            ["r1a", "r1b", "r2", "c1"]
        );
    }

    #[test]
    fn reason_text_names_the_rule() {
        let r = ExpiryReason {
            field: "metadata_days",
            days: 365,
            created_at: 0,
            expires_at: 365 * DAY_MS,
        };
        assert_eq!(
            r.to_string(),
            "metadata_days=365 elapsed (created at 0 ms, expired at 31536000000 ms, unix time)"
        );
    }
}
