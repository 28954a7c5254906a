//! The two database engines behind [`super::Store`]: SQLite (the embedded
//! default) and PostgreSQL (several daemons sharing one database, issue 16).
//!
//! Owns: running one SQL text on either engine with the same parameters and
//! the same row shape, transactions, and the few places where the dialects
//! differ ([`Dialect`]). Statements are written once, in the common subset of
//! both dialects, with SQLite's numbered placeholders `?1`, `?2`…, which this
//! module rewrites to PostgreSQL's `$1`, `$2`… Values cross as [`Value`]
//! (null, 64-bit integer, double, text, bytes), so a statement's meaning does
//! not depend on the engine. Must not hold queries of its own (those live in
//! `db` and `schema`).
//!
//! Both engines run one statement at a time per [`Conn`]: `Store` is used from
//! one thread, so a `RefCell` around the PostgreSQL client is enough.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use postgres::types::{IsNull, ToSql as PgToSql, Type, to_sql_checked};

use super::DbError;

/// A value crossing between Rust and either engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// Any integer (booleans are 0/1).
    Int(i64),
    /// A double.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

/// Rust values that can be a statement parameter.
pub trait ToValue {
    /// The value to bind.
    fn to_value(&self) -> Value;
}

/// Rust values that can be read from a column.
pub trait FromValue: Sized {
    /// Converts the column value, failing on the wrong type or a NULL where
    /// none is allowed.
    fn from_value(v: &Value) -> Result<Self, DbError>;
}

fn type_error(want: &str, got: &Value) -> DbError {
    DbError::Type(format!("expected {want}, found {got:?}"))
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}

impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}

macro_rules! int_value {
    ($($t:ty),+) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                // u64 above i64::MAX does not occur (counters, milliseconds);
                // saturating keeps the statement valid if it ever did.
                Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
            }
        }
        impl FromValue for $t {
            fn from_value(v: &Value) -> Result<Self, DbError> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i)
                        .map_err(|_| DbError::Type(format!("{i} out of range for {}", stringify!($t)))),
                    other => Err(type_error(stringify!($t), other)),
                }
            }
        }
    )+};
}
int_value!(i64, i32, u64, u32, u16, u8);

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, DbError> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, DbError> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other => Err(type_error("text", other)),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Result<Self, DbError> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            other => Err(type_error("bytes", other)),
        }
    }
}

impl FromValue for bool {
    fn from_value(v: &Value) -> Result<Self, DbError> {
        match v {
            Value::Int(i) => Ok(*i != 0),
            other => Err(type_error("boolean", other)),
        }
    }
}

impl FromValue for f64 {
    fn from_value(v: &Value) -> Result<Self, DbError> {
        match v {
            Value::Real(f) => Ok(*f),
            #[allow(clippy::cast_precision_loss)]
            Value::Int(i) => Ok(*i as f64),
            other => Err(type_error("real", other)),
        }
    }
}

/// Builds a parameter list: `vals![a, b, c]`.
macro_rules! vals {
    ($($x:expr),* $(,)?) => {
        [$($crate::store::db::conn::ToValue::to_value(&$x)),*]
    };
}
pub(crate) use vals;

/// One result row.
#[derive(Debug)]
pub struct Row(Vec<Value>);

impl Row {
    /// Column `i`, converted.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, DbError> {
        let v = self
            .0
            .get(i)
            .ok_or_else(|| DbError::Type(format!("no column {i}")))?;
        T::from_value(v)
    }

    /// Column `i` as it came.
    pub fn value(&self, i: usize) -> &Value {
        self.0.get(i).unwrap_or(&Value::Null)
    }
}

/// Which engine a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite (one file, one writer at a time).
    Sqlite,
    /// PostgreSQL (shared by several daemons).
    Postgres,
}

impl Dialect {
    /// ` FOR UPDATE` on PostgreSQL: locks the selected rows until the
    /// transaction ends, so two daemons acting on the same row take turns.
    /// Empty on SQLite, whose write transactions already exclude each other.
    pub fn for_update(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }
}

struct Pg {
    /// `None` only while being dropped.
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
    /// To reconnect after the server restarted or the connection broke.
    url: zeroize::Zeroizing<String>,
}

impl Drop for Pg {
    /// Closing the client blocks on its runtime: off any tokio runtime.
    fn drop(&mut self) {
        self.statements.clear();
        if let Some(client) = self.client.take() {
            off_runtime(move || drop(client));
        }
    }
}

impl Pg {
    /// The client, reconnected first when the last statement found the
    /// connection closed (server restart, network cut) and no transaction
    /// was open on it: the statement that saw the break failed (its caller
    /// retries), the next one runs on a new connection. Inside a
    /// transaction the break stays an error until the transaction ends, so a
    /// COMMIT never lands on a connection that did not run its statements.
    fn client(&mut self, may_reconnect: bool) -> Result<&mut postgres::Client, DbError> {
        let closed = self.client.as_ref().is_none_or(postgres::Client::is_closed);
        if closed && may_reconnect {
            self.statements.clear();
            let url: &str = &self.url;
            let fresh = off_runtime(|| postgres::Client::connect(url, postgres::NoTls))?;
            if let Some(old) = self.client.replace(fresh) {
                off_runtime(move || drop(old));
            }
        }
        self.client
            .as_mut()
            .ok_or(DbError::Misuse("connection closed"))
    }
}

enum Engine {
    Sqlite(rusqlite::Connection),
    Postgres(Box<RefCell<Pg>>),
}

/// A connection to either engine.
pub struct Conn {
    engine: Engine,
    in_tx: Cell<bool>,
    /// The open transaction is a group-commit batch ([`Conn::begin_batch`]):
    /// transactions begun inside it are savepoints.
    batching: Cell<bool>,
    /// Savepoints open inside the batch.
    depth: Cell<u32>,
    /// Write transactions committed: each COMMIT, and each write statement
    /// run outside a transaction (its own implicit transaction).
    commits: Cell<u64>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("dialect", &self.dialect())
            .finish_non_exhaustive()
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl PgToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                #[allow(clippy::cast_precision_loss)]
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                _ => Err(format!("integer parameter for a {ty} column").into()),
            },
            Value::Real(f) => match *ty {
                #[allow(clippy::cast_possible_truncation)]
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ => f.to_sql(ty, out),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Runs `f` where the synchronous PostgreSQL client may block: the client
/// drives its own small runtime, which tokio refuses to start on a thread
/// that is inside a runtime (the admin API's blocking tasks, start-up code in
/// `async fn`s). There `f` runs on a scoped thread of its own; on the store
/// thread and in the CLI it runs in place.
pub(crate) fn off_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// `?N` placeholders to `$N` (statements never contain `?` otherwise).
fn pg_sql(sql: &str) -> String {
    sql.replace('?', "$")
}

fn pg_value(row: &postgres::Row, i: usize) -> Result<Value, DbError> {
    let ty = row.columns()[i].type_().clone();
    Ok(match ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Value::Real),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)?
            .map(|v| Value::Real(v.into())),
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
        _ => row.try_get::<_, Option<String>>(i)?.map(Value::Text),
    }
    .unwrap_or(Value::Null))
}

impl Conn {
    /// Wraps an open SQLite connection.
    pub fn sqlite(conn: rusqlite::Connection) -> Conn {
        Conn {
            engine: Engine::Sqlite(conn),
            in_tx: Cell::new(false),
            batching: Cell::new(false),
            depth: Cell::new(0),
            commits: Cell::new(0),
        }
    }

    /// Connects to the PostgreSQL database at `url` (no TLS).
    pub fn connect_postgres(url: &str) -> Result<Conn, DbError> {
        let client = off_runtime(|| postgres::Client::connect(url, postgres::NoTls))?;
        Ok(Conn {
            engine: Engine::Postgres(Box::new(RefCell::new(Pg {
                client: Some(client),
                statements: HashMap::new(),
                url: zeroize::Zeroizing::new(url.to_owned()),
            }))),
            in_tx: Cell::new(false),
            batching: Cell::new(false),
            depth: Cell::new(0),
            commits: Cell::new(0),
        })
    }

    /// The engine's dialect.
    pub fn dialect(&self) -> Dialect {
        match self.engine {
            Engine::Sqlite(_) => Dialect::Sqlite,
            Engine::Postgres(_) => Dialect::Postgres,
        }
    }

    /// The SQLite connection (pragmas, checkpoints); `None` on PostgreSQL.
    pub fn as_sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.engine {
            Engine::Sqlite(c) => Some(c),
            Engine::Postgres(_) => None,
        }
    }

    /// Runs statements without parameters (several, separated by `;`).
    pub fn batch(&self, sql: &str) -> Result<(), DbError> {
        match &self.engine {
            Engine::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Engine::Postgres(pg) => {
                let mut pg = pg.borrow_mut();
                let client = pg.client(!self.in_tx.get())?;
                Ok(off_runtime(|| client.batch_execute(sql))?)
            }
        }
    }

    fn with_pg_statement<R: Send>(
        &self,
        pg: &RefCell<Pg>,
        sql: &str,
        run: impl FnOnce(&mut postgres::Client, &postgres::Statement) -> Result<R, postgres::Error>
        + Send,
    ) -> Result<R, DbError> {
        let mut pg = pg.borrow_mut();
        pg.client(!self.in_tx.get())?;
        let Pg {
            client, statements, ..
        } = &mut *pg;
        let client = client
            .as_mut()
            .ok_or(DbError::Misuse("connection closed"))?;
        off_runtime(|| {
            let stmt = match statements.get(sql) {
                Some(s) => s.clone(),
                None => {
                    let s = client.prepare(&pg_sql(sql))?;
                    statements.insert(sql.to_owned(), s.clone());
                    s
                }
            };
            Ok(run(client, &stmt)?)
        })
    }

    /// Runs one statement; returns the number of rows it changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<usize, DbError> {
        let n = self.execute_inner(sql, params)?;
        if !self.in_tx.get() {
            self.commits.set(self.commits.get() + 1);
        }
        Ok(n)
    }

    fn execute_inner(&self, sql: &str, params: &[Value]) -> Result<usize, DbError> {
        match &self.engine {
            Engine::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))?)
            }
            Engine::Postgres(pg) => {
                let refs: Vec<&(dyn PgToSql + Sync)> =
                    params.iter().map(|v| v as &(dyn PgToSql + Sync)).collect();
                let n = self.with_pg_statement(pg, sql, |c, s| c.execute(s, &refs))?;
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            }
        }
    }

    /// Runs one query; returns every row.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match &self.engine {
            Engine::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut vals = Vec::with_capacity(n);
                    for i in 0..n {
                        use rusqlite::types::ValueRef;
                        vals.push(match r.get_ref(i)? {
                            ValueRef::Null => Value::Null,
                            ValueRef::Integer(i) => Value::Int(i),
                            ValueRef::Real(f) => Value::Real(f),
                            ValueRef::Text(t) => {
                                Value::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                        });
                    }
                    out.push(Row(vals));
                }
                Ok(out)
            }
            Engine::Postgres(pg) => {
                let refs: Vec<&(dyn PgToSql + Sync)> =
                    params.iter().map(|v| v as &(dyn PgToSql + Sync)).collect();
                let rows = self.with_pg_statement(pg, sql, |c, s| c.query(s, &refs))?;
                rows.iter()
                    .map(|r| (0..r.len()).map(|i| pg_value(r, i)).collect())
                    .map(|v: Result<Vec<Value>, DbError>| v.map(Row))
                    .collect()
            }
        }
    }

    /// Runs one query and converts every row with `f`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: &[Value],
        f: impl FnMut(&Row) -> Result<T, DbError>,
    ) -> Result<Vec<T>, DbError> {
        self.query(sql, params)?.iter().map(f).collect()
    }

    /// The first row of a query converted with `f`, if there is one.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: &[Value],
        f: impl FnOnce(&Row) -> Result<T, DbError>,
    ) -> Result<Option<T>, DbError> {
        self.query_opt(sql, params)?.as_ref().map(f).transpose()
    }

    /// The first row of a query, if any.
    pub fn query_opt(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The one row a query must return.
    pub fn query_one(&self, sql: &str, params: &[Value]) -> Result<Row, DbError> {
        self.query_opt(sql, params)?
            .ok_or(DbError::Misuse("query returned no row"))
    }

    /// Starts a write transaction: `BEGIN IMMEDIATE` on SQLite (takes the
    /// write lock now, so the reads inside see what the writes act on),
    /// `BEGIN` on PostgreSQL (read committed; rows the transaction acts on
    /// are locked with [`Dialect::for_update`] or by the writes themselves).
    /// Inside a batch ([`Conn::begin_batch`]) it is a savepoint instead: its
    /// commit releases the savepoint (the batch's COMMIT makes it durable),
    /// its rollback undoes only its own statements. Rolled back on drop
    /// unless [`Tx::commit`] is called.
    pub fn begin(&self) -> Result<Tx<'_>, DbError> {
        if self.in_tx.get() {
            if !self.batching.get() {
                return Err(DbError::Misuse("nested transaction"));
            }
            let depth = self.enter_savepoint()?;
            return Ok(Tx {
                conn: self,
                done: false,
                savepoint: Some(depth),
            });
        }
        self.begin_top()?;
        Ok(Tx {
            conn: self,
            done: false,
            savepoint: None,
        })
    }

    fn begin_top(&self) -> Result<(), DbError> {
        self.batch(match self.dialect() {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        })?;
        self.in_tx.set(true);
        Ok(())
    }

    /// Opens a group-commit batch: one transaction that many writes join
    /// (each in a savepoint of its own, see [`Conn::savepoint`]), made
    /// durable by one [`Conn::commit_batch`]. Refused inside a transaction.
    pub fn begin_batch(&self) -> Result<(), DbError> {
        if self.in_tx.get() {
            return Err(DbError::Misuse("batch inside a transaction"));
        }
        self.begin_top()?;
        self.batching.set(true);
        Ok(())
    }

    /// Whether a batch is open.
    pub fn in_batch(&self) -> bool {
        self.batching.get()
    }

    /// Commits the open batch; on failure it is rolled back, whole (the
    /// caller still has every write of it to apply again).
    pub fn commit_batch(&self) -> Result<(), DbError> {
        if !self.batching.get() {
            return Err(DbError::Misuse("no batch open"));
        }
        let result = self.finish_top(true);
        self.batching.set(false);
        self.depth.set(0);
        result
    }

    /// Rolls the open batch back, whole (nothing of it stays). SQLite may
    /// have rolled it back itself already (a full disk): that is no error.
    pub fn rollback_batch(&self) {
        if self.batching.get() {
            let _ = self.finish_top(false);
            self.batching.set(false);
            self.depth.set(0);
        }
    }

    /// COMMIT (or ROLLBACK) of the top-level transaction. `in_tx` stays set
    /// while COMMIT runs: a broken connection is not replaced under it (see
    /// `Pg::client`).
    fn finish_top(&self, commit: bool) -> Result<(), DbError> {
        let result = if commit {
            match self.batch("COMMIT") {
                Ok(()) => {
                    self.commits.set(self.commits.get() + 1);
                    Ok(())
                }
                Err(e) => {
                    let _ = self.batch("ROLLBACK");
                    Err(e)
                }
            }
        } else {
            self.batch("ROLLBACK")
        };
        self.in_tx.set(false);
        result
    }

    /// Opens savepoint `sb<depth>` inside the batch; returns its depth.
    /// See [`super::Store::batched`].
    pub(crate) fn enter_savepoint(&self) -> Result<u32, DbError> {
        let depth = self.depth.get() + 1;
        self.batch(&format!("SAVEPOINT sb{depth}"))?;
        self.depth.set(depth);
        Ok(depth)
    }

    /// Releases savepoint `depth` (its writes join the batch), or rolls back
    /// to it and releases it (its writes are undone).
    pub(crate) fn leave_savepoint(&self, depth: u32, keep: bool) -> Result<(), DbError> {
        self.depth.set(depth - 1);
        if keep {
            match self.batch(&format!("RELEASE SAVEPOINT sb{depth}")) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let _ = self.batch(&format!(
                        "ROLLBACK TO SAVEPOINT sb{depth}; RELEASE SAVEPOINT sb{depth}"
                    ));
                    return Err(e);
                }
            }
        }
        // SQLite may have rolled the whole transaction back already (a full
        // disk): the savepoint is gone then, which the batch's commit reports.
        let _ = self.batch(&format!(
            "ROLLBACK TO SAVEPOINT sb{depth}; RELEASE SAVEPOINT sb{depth}"
        ));
        Ok(())
    }

    /// Write transactions this connection committed: each COMMIT (a batch
    /// counts once, however many writes it holds) and each write statement
    /// run outside a transaction.
    pub fn commits(&self) -> u64 {
        self.commits.get()
    }
}

/// An open transaction (or, inside a batch, a savepoint); derefs to its
/// connection.
pub struct Tx<'a> {
    conn: &'a Conn,
    done: bool,
    /// The savepoint's depth when this is one.
    savepoint: Option<u32>,
}

impl Tx<'_> {
    /// Commits (inside a batch: releases the savepoint).
    pub fn commit(mut self) -> Result<(), DbError> {
        self.done = true;
        match self.savepoint {
            Some(depth) => self.conn.leave_savepoint(depth, true),
            None => self.conn.finish_top(true),
        }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.done {
            match self.savepoint {
                Some(depth) => {
                    let _ = self.conn.leave_savepoint(depth, false);
                }
                None => {
                    let _ = self.conn.finish_top(false);
                }
            }
        }
    }
}
