//! The SQL `install` runs in a site's LIMS database: labrelay's bookkeeping tables and
//! the capture triggers on the mapped tables. `uninstall` drops the triggers (and, with
//! `--purge`, the tables). Both are idempotent; `--print` shows the statements.
//!
//! The triggers write one outbox row per changed row, in the changing transaction, and
//! stay silent while the applier writes (PostgreSQL: the transaction-local setting
//! `labrelay.applying`; MariaDB: the session variable `@labrelay_applying`; SQLite: a row
//! in `labrelay_sync_applying`, which only the applier's open transaction can hold), so
//! an applied remote change is never captured and sent back.

use labrelay::db::Engine;

use crate::config::{LinkSpec, ObjectSpec, Plan};

/// PostgreSQL: the channel the capture triggers notify (once per transaction: equal
/// notifications of one transaction are folded), so `relay --follow` wakes at once.
pub const NOTIFY_CHANNEL: &str = "labrelay_sync";

/// The bookkeeping tables, in creation order.
pub const TABLES: &[&str] = &[
    "labrelay_sync_outbox",
    "labrelay_sync_ids",
    "labrelay_sync_fields",
    "labrelay_sync_inbox",
    "labrelay_sync_parked",
    "labrelay_sync_dead",
    "labrelay_sync_clock",
    "labrelay_sync_applying",
];

fn q(engine: Engine, ident: &str) -> String {
    match engine {
        Engine::Mysql => format!("`{ident}`"),
        Engine::Postgres | Engine::Sqlite => format!("\"{ident}\""),
    }
}

/// The current time in milliseconds, in SQL.
fn now_ms_sql(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => "(extract(epoch from clock_timestamp()) * 1000)::bigint",
        Engine::Mysql => "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
        Engine::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    }
}

/// The bookkeeping tables.
pub fn tables(engine: Engine) -> Vec<String> {
    let (serial, text, big) = match engine {
        Engine::Postgres => ("BIGSERIAL PRIMARY KEY", "TEXT", "BIGINT"),
        Engine::Mysql => ("BIGINT AUTO_INCREMENT PRIMARY KEY", "LONGTEXT", "BIGINT"),
        Engine::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "TEXT", "INTEGER"),
    };
    let ine = "IF NOT EXISTS";
    let mut v = vec![
        // One row per captured change; `event` holds the prepared message once the
        // relay has stamped it, so a resend after a crash sends the same bytes.
        format!(
            "CREATE TABLE {ine} labrelay_sync_outbox (
  id {serial},
  object_type VARCHAR(64) NOT NULL,
  local_key VARCHAR(191) NOT NULL,
  right_key VARCHAR(191),
  op VARCHAR(16) NOT NULL,
  captured_ms {big} NOT NULL,
  state VARCHAR(16) NOT NULL DEFAULT 'new',
  event_id VARCHAR(36),
  routing_key VARCHAR(255),
  event {text},
  note VARCHAR(255),
  sent_ms {big}
)"
        ),
        format!(
            "CREATE TABLE {ine} labrelay_sync_ids (
  object_type VARCHAR(64) NOT NULL,
  uuid VARCHAR(36) NOT NULL,
  local_key VARCHAR(191) NOT NULL,
  origin VARCHAR(64) NOT NULL,
  origin_key VARCHAR(191) NOT NULL,
  PRIMARY KEY (object_type, uuid),
  UNIQUE (object_type, local_key)
)"
        ),
        // The value (canonical JSON) and version of each synced field this site holds.
        format!(
            "CREATE TABLE {ine} labrelay_sync_fields (
  object_type VARCHAR(64) NOT NULL,
  uuid VARCHAR(80) NOT NULL,
  field VARCHAR(64) NOT NULL,
  version VARCHAR(100) NOT NULL,
  value {text},
  PRIMARY KEY (object_type, uuid, field)
)"
        ),
        format!(
            "CREATE TABLE {ine} labrelay_sync_inbox (
  event_id VARCHAR(36) NOT NULL PRIMARY KEY,
  site VARCHAR(64) NOT NULL,
  applied_ms {big} NOT NULL,
  outcome VARCHAR(32) NOT NULL
)"
        ),
        format!(
            "CREATE TABLE {ine} labrelay_sync_parked (
  event_id VARCHAR(36) NOT NULL PRIMARY KEY,
  waiting_type VARCHAR(64) NOT NULL,
  waiting_uuid VARCHAR(36) NOT NULL,
  parked_ms {big} NOT NULL,
  event {text} NOT NULL
)"
        ),
        format!(
            "CREATE TABLE {ine} labrelay_sync_dead (
  id {serial},
  event_id VARCHAR(64),
  site VARCHAR(64),
  reason VARCHAR(1000) NOT NULL,
  dead_ms {big} NOT NULL,
  body {text}
)"
        ),
        format!(
            "CREATE TABLE {ine} labrelay_sync_clock (
  id INTEGER NOT NULL PRIMARY KEY,
  wall {big} NOT NULL,
  counter {big} NOT NULL
)"
        ),
        format!("CREATE TABLE {ine} labrelay_sync_applying (token INTEGER NOT NULL)"),
    ];
    v.push(match engine {
        Engine::Postgres => "INSERT INTO labrelay_sync_clock (id, wall, counter) VALUES (1, 0, 0) \
                             ON CONFLICT (id) DO NOTHING"
            .into(),
        Engine::Mysql => {
            "INSERT IGNORE INTO labrelay_sync_clock (id, wall, counter) VALUES (1, 0, 0)".into()
        }
        Engine::Sqlite => {
            "INSERT OR IGNORE INTO labrelay_sync_clock (id, wall, counter) VALUES (1, 0, 0)".into()
        }
    });
    let idx = |name: &str, on: &str| format!("CREATE INDEX {ine} {name} ON {on}");
    v.push(idx(
        "labrelay_sync_outbox_state",
        "labrelay_sync_outbox (state, id)",
    ));
    v.push(idx(
        "labrelay_sync_parked_waiting",
        "labrelay_sync_parked (waiting_type, waiting_uuid)",
    ));
    v
}

/// Trigger names for an object or link table.
fn trigger_names(name: &str) -> [String; 3] {
    [
        format!("labrelay_sync_{name}_ins"),
        format!("labrelay_sync_{name}_upd"),
        format!("labrelay_sync_{name}_del"),
    ]
}

/// A captured change as SQL: the outbox insert for `op` with key expressions.
fn outbox_insert(engine: Engine, ty: &str, key: &str, right: Option<&str>, op: &str) -> String {
    format!(
        "INSERT INTO labrelay_sync_outbox (object_type, local_key, right_key, op, captured_ms) \
         VALUES ('{ty}', {key}, {}, '{op}', {})",
        right.unwrap_or("NULL"),
        now_ms_sql(engine)
    )
}

fn as_text(engine: Engine, expr: &str) -> String {
    match engine {
        Engine::Mysql => format!("CAST({expr} AS CHAR)"),
        Engine::Postgres | Engine::Sqlite => format!("CAST({expr} AS TEXT)"),
    }
}

/// Triggers of one object type.
fn object_triggers(engine: Engine, o: &ObjectSpec) -> Vec<String> {
    let table = q(engine, &o.table);
    let [ins, upd, del] = trigger_names(&o.name);
    let key = q(engine, &o.key);
    let columns: Vec<String> = o.fields.iter().map(|f| q(engine, &f.column)).collect();
    let mut columns_with_temp = columns.clone();
    if o.temporary.is_some() {
        // The temporary predicate may use other columns; any update may change it.
        columns_with_temp.clear();
    }
    match engine {
        Engine::Postgres => {
            let of = if columns_with_temp.is_empty() {
                String::new()
            } else {
                format!(" OF {}", columns_with_temp.join(", "))
            };
            vec![
                format!("DROP TRIGGER IF EXISTS {ins} ON {table}"),
                format!("DROP TRIGGER IF EXISTS {upd} ON {table}"),
                format!("DROP TRIGGER IF EXISTS {del} ON {table}"),
                format!(
                    "CREATE TRIGGER {ins} AFTER INSERT ON {table} FOR EACH ROW \
                     EXECUTE FUNCTION labrelay_sync_capture('{}', '{}', 'save')",
                    o.name, o.key
                ),
                format!(
                    "CREATE TRIGGER {upd} AFTER UPDATE{of} ON {table} FOR EACH ROW \
                     EXECUTE FUNCTION labrelay_sync_capture('{}', '{}', 'save')",
                    o.name, o.key
                ),
                format!(
                    "CREATE TRIGGER {del} AFTER DELETE ON {table} FOR EACH ROW \
                     EXECUTE FUNCTION labrelay_sync_capture('{}', '{}', 'delete')",
                    o.name, o.key
                ),
            ]
        }
        Engine::Mysql => {
            let body = |row: &str, op: &str| {
                format!(
                    "BEGIN IF @labrelay_applying IS NULL THEN {}; END IF; END",
                    outbox_insert(
                        engine,
                        &o.name,
                        &as_text(engine, &format!("{row}.{key}")),
                        None,
                        op
                    )
                )
            };
            vec![
                format!("DROP TRIGGER IF EXISTS {ins}"),
                format!("DROP TRIGGER IF EXISTS {upd}"),
                format!("DROP TRIGGER IF EXISTS {del}"),
                format!(
                    "CREATE TRIGGER {ins} AFTER INSERT ON {table} FOR EACH ROW {}",
                    body("NEW", "save")
                ),
                format!(
                    "CREATE TRIGGER {upd} AFTER UPDATE ON {table} FOR EACH ROW {}",
                    body("NEW", "save")
                ),
                format!(
                    "CREATE TRIGGER {del} AFTER DELETE ON {table} FOR EACH ROW {}",
                    body("OLD", "delete")
                ),
            ]
        }
        Engine::Sqlite => {
            let of = if columns_with_temp.is_empty() {
                String::new()
            } else {
                format!(" OF {}", columns_with_temp.join(", "))
            };
            let when = "WHEN NOT EXISTS (SELECT 1 FROM labrelay_sync_applying)";
            let stmt = |row: &str, op: &str| {
                outbox_insert(
                    engine,
                    &o.name,
                    &as_text(engine, &format!("{row}.{key}")),
                    None,
                    op,
                )
            };
            vec![
                format!("DROP TRIGGER IF EXISTS {ins}"),
                format!("DROP TRIGGER IF EXISTS {upd}"),
                format!("DROP TRIGGER IF EXISTS {del}"),
                format!(
                    "CREATE TRIGGER {ins} AFTER INSERT ON {table} FOR EACH ROW {when} BEGIN {}; END",
                    stmt("NEW", "save")
                ),
                format!(
                    "CREATE TRIGGER {upd} AFTER UPDATE{of} ON {table} FOR EACH ROW {when} BEGIN {}; END",
                    stmt("NEW", "save")
                ),
                format!(
                    "CREATE TRIGGER {del} AFTER DELETE ON {table} FOR EACH ROW {when} BEGIN {}; END",
                    stmt("OLD", "delete")
                ),
            ]
        }
    }
}

/// Triggers of one link table (insert = connect, delete = disconnect; an update is a
/// disconnect of the old pair and a connect of the new one).
fn link_triggers(engine: Engine, l: &LinkSpec) -> Vec<String> {
    let table = q(engine, &l.table);
    let [ins, upd, del] = trigger_names(&l.name);
    let (lc, rc) = (q(engine, &l.left.column), q(engine, &l.right.column));
    match engine {
        Engine::Postgres => vec![
            format!("DROP TRIGGER IF EXISTS {ins} ON {table}"),
            format!("DROP TRIGGER IF EXISTS {upd} ON {table}"),
            format!("DROP TRIGGER IF EXISTS {del} ON {table}"),
            format!(
                "CREATE TRIGGER {ins} AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW \
                 EXECUTE FUNCTION labrelay_sync_capture_link('{}', '{}', '{}')",
                l.name, l.left.column, l.right.column
            ),
        ],
        Engine::Mysql | Engine::Sqlite => {
            let t = |row: &str, col: &str| as_text(engine, &format!("{row}.{col}"));
            let connect = outbox_insert(
                engine,
                &l.name,
                &t("NEW", &lc),
                Some(&t("NEW", &rc)),
                "connect",
            );
            let disconnect = outbox_insert(
                engine,
                &l.name,
                &t("OLD", &lc),
                Some(&t("OLD", &rc)),
                "disconnect",
            );
            let (pre, post) = if engine == Engine::Mysql {
                ("BEGIN IF @labrelay_applying IS NULL THEN", "; END IF; END")
            } else {
                (
                    "WHEN NOT EXISTS (SELECT 1 FROM labrelay_sync_applying) BEGIN",
                    "; END",
                )
            };
            vec![
                format!("DROP TRIGGER IF EXISTS {ins}"),
                format!("DROP TRIGGER IF EXISTS {upd}"),
                format!("DROP TRIGGER IF EXISTS {del}"),
                format!(
                    "CREATE TRIGGER {ins} AFTER INSERT ON {table} FOR EACH ROW {pre} {connect}{post}"
                ),
                format!(
                    "CREATE TRIGGER {upd} AFTER UPDATE ON {table} FOR EACH ROW {pre} {disconnect}; {connect}{post}"
                ),
                format!(
                    "CREATE TRIGGER {del} AFTER DELETE ON {table} FOR EACH ROW {pre} {disconnect}{post}"
                ),
            ]
        }
    }
}

/// PostgreSQL's trigger functions (shared by all tables).
fn pg_functions() -> Vec<String> {
    let now = now_ms_sql(Engine::Postgres);
    vec![
        format!(
            "CREATE OR REPLACE FUNCTION labrelay_sync_capture() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
  IF coalesce(current_setting('labrelay.applying', true), '') = 'on' THEN RETURN NULL; END IF;
  IF TG_OP = 'DELETE' THEN
    INSERT INTO labrelay_sync_outbox (object_type, local_key, op, captured_ms)
      VALUES (TG_ARGV[0], to_jsonb(OLD) ->> TG_ARGV[1], 'delete', {now});
  ELSE
    INSERT INTO labrelay_sync_outbox (object_type, local_key, op, captured_ms)
      VALUES (TG_ARGV[0], to_jsonb(NEW) ->> TG_ARGV[1], TG_ARGV[2], {now});
  END IF;
  PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
  RETURN NULL;
END
$fn$"
        ),
        format!(
            "CREATE OR REPLACE FUNCTION labrelay_sync_capture_link() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
  IF coalesce(current_setting('labrelay.applying', true), '') = 'on' THEN RETURN NULL; END IF;
  IF TG_OP IN ('DELETE', 'UPDATE') THEN
    INSERT INTO labrelay_sync_outbox (object_type, local_key, right_key, op, captured_ms)
      VALUES (TG_ARGV[0], to_jsonb(OLD) ->> TG_ARGV[1], to_jsonb(OLD) ->> TG_ARGV[2], 'disconnect', {now});
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    INSERT INTO labrelay_sync_outbox (object_type, local_key, right_key, op, captured_ms)
      VALUES (TG_ARGV[0], to_jsonb(NEW) ->> TG_ARGV[1], to_jsonb(NEW) ->> TG_ARGV[2], 'connect', {now});
  END IF;
  PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
  RETURN NULL;
END
$fn$"
        ),
    ]
}

/// Everything `install` runs, in order.
pub fn install(engine: Engine, plan: &Plan) -> Vec<String> {
    let mut v = tables(engine);
    if engine == Engine::Postgres {
        v.extend(pg_functions());
    }
    for o in plan.objects.values() {
        v.extend(object_triggers(engine, o));
    }
    for l in plan.links.values() {
        v.extend(link_triggers(engine, l));
    }
    v
}

/// Everything `uninstall` runs: the triggers and functions; with `purge`, the tables.
pub fn uninstall(engine: Engine, plan: &Plan, purge: bool) -> Vec<String> {
    let mut v = Vec::new();
    let tables = plan
        .objects
        .values()
        .map(|o| (&o.name, &o.table))
        .chain(plan.links.values().map(|l| (&l.name, &l.table)));
    for (name, table) in tables {
        for t in trigger_names(name) {
            v.push(match engine {
                Engine::Postgres => format!("DROP TRIGGER IF EXISTS {t} ON {}", q(engine, table)),
                Engine::Mysql | Engine::Sqlite => format!("DROP TRIGGER IF EXISTS {t}"),
            });
        }
    }
    if engine == Engine::Postgres {
        v.push("DROP FUNCTION IF EXISTS labrelay_sync_capture()".into());
        v.push("DROP FUNCTION IF EXISTS labrelay_sync_capture_link()".into());
    }
    if purge {
        for t in TABLES.iter().rev() {
            v.push(format!("DROP TABLE IF EXISTS {t}"));
        }
    }
    v
}
