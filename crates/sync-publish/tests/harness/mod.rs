//! Three LIMS sites with schemas of their own (different local ids), a config for
//! them, and helpers to run the tool and read what each site holds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Output;

use labrelay::config::DatabaseConfig;
use labrelay::db::{Db, Engine};
use labrelay::secret::RedactedUrl;
use sqlx::Row;

use crate::BIN;

/// One site's database.
pub struct SiteDb {
    pub name: &'static str,
    pub db: Db,
    pub url: String,
    admin: Option<(Db, String)>,
}

impl SiteDb {
    pub fn engine(&self) -> Engine {
        self.db.engine()
    }

    /// Run statements (no binds).
    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(self.db.pool())
            .await
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.name));
    }

    /// A single integer.
    pub async fn int(&self, sql: &str) -> i64 {
        let row = sqlx::query(sql)
            .fetch_one(self.db.pool())
            .await
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.name));
        row.try_get::<Option<i64>, _>(0).unwrap().unwrap_or(0)
    }

    /// Rows of text columns (NULL as "-").
    pub async fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        let rows = sqlx::query(sql)
            .fetch_all(self.db.pool())
            .await
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.name));
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| match r.try_get::<Option<i64>, _>(i) {
                        Ok(v) => v.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                        Err(_) => labrelay::db::opt_text(r, i)
                            .unwrap()
                            .unwrap_or_else(|| "-".into()),
                    })
                    .collect()
            })
            .collect()
    }

    /// Users by email: name, active, org unit name, phone.
    pub async fn users(&self) -> BTreeMap<String, Vec<String>> {
        self.rows(
            "SELECT u.email, u.name, CASE WHEN u.active THEN 1 ELSE 0 END, o.name, u.phone \
             FROM users u LEFT JOIN org_unit o ON o.id = u.org_unit_id WHERE NOT u.is_temp ORDER BY u.email",
        )
        .await
        .into_iter()
        .map(|mut r| (r.remove(0), r))
        .collect()
    }

    /// Labs by name: active, PI email, member emails.
    pub async fn labs(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for mut r in self
            .rows(
                "SELECT l.name, CASE WHEN l.active THEN 1 ELSE 0 END, u.email, l.id FROM lab l \
                 LEFT JOIN users u ON u.id = l.pi_id ORDER BY l.name",
            )
            .await
        {
            let id = r.pop().unwrap();
            let members = self
                .rows(&format!(
                    "SELECT u.email FROM user_lab x JOIN users u ON u.id = x.user_id WHERE x.lab_id = {id} ORDER BY u.email"
                ))
                .await;
            r.push(
                members
                    .into_iter()
                    .map(|m| m[0].clone())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            out.insert(r.remove(0), r);
        }
        out
    }

    /// Equipment names and colleges.
    pub async fn equipment(&self) -> Vec<Vec<String>> {
        self.rows("SELECT name, college FROM equipment ORDER BY name")
            .await
    }

    /// Org units: name and parent name.
    pub async fn org_units(&self) -> Vec<Vec<String>> {
        self.rows(
            "SELECT o.name, p.name FROM org_unit o LEFT JOIN org_unit p ON p.id = o.parent_id ORDER BY o.name",
        )
        .await
    }

    /// Drop a server database.
    pub async fn drop(self) {
        self.db.close().await;
        if let Some((admin, name)) = self.admin {
            let _ = sqlx::raw_sql(&format!("DROP DATABASE {name}"))
                .execute(admin.pool())
                .await;
            admin.close().await;
        }
    }
}

/// The LIMS schema of each engine; ids start at a different number per site.
fn schema(engine: Engine, first_id: u32) -> String {
    match engine {
        Engine::Postgres => format!(
            "CREATE TABLE org_unit (id SERIAL PRIMARY KEY, name TEXT NOT NULL, parent_id INTEGER REFERENCES org_unit(id));
             CREATE TABLE users (id SERIAL PRIMARY KEY, name TEXT NOT NULL, email TEXT, active BOOLEAN NOT NULL DEFAULT TRUE,
               org_unit_id INTEGER REFERENCES org_unit(id), is_temp BOOLEAN NOT NULL DEFAULT FALSE, password_hash TEXT, phone TEXT);
             CREATE TABLE lab (id SERIAL PRIMARY KEY, name TEXT NOT NULL, pi_id INTEGER REFERENCES users(id),
               active BOOLEAN NOT NULL DEFAULT TRUE, is_temp BOOLEAN NOT NULL DEFAULT FALSE);
             CREATE TABLE equipment (id SERIAL PRIMARY KEY, name TEXT NOT NULL, college TEXT);
             CREATE TABLE user_lab (user_id INTEGER NOT NULL REFERENCES users(id), lab_id INTEGER NOT NULL REFERENCES lab(id),
               PRIMARY KEY (user_id, lab_id));
             ALTER SEQUENCE org_unit_id_seq RESTART WITH {first_id};
             ALTER SEQUENCE users_id_seq RESTART WITH {first_id};
             ALTER SEQUENCE lab_id_seq RESTART WITH {first_id};
             ALTER SEQUENCE equipment_id_seq RESTART WITH {first_id};"
        ),
        Engine::Mysql => format!(
            "CREATE TABLE org_unit (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(200) NOT NULL, parent_id INT NULL,
               FOREIGN KEY (parent_id) REFERENCES org_unit(id)) AUTO_INCREMENT = {first_id};
             CREATE TABLE users (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(200) NOT NULL, email VARCHAR(200),
               active TINYINT(1) NOT NULL DEFAULT 1, org_unit_id INT NULL, is_temp TINYINT(1) NOT NULL DEFAULT 0,
               password_hash VARCHAR(200), phone VARCHAR(50), FOREIGN KEY (org_unit_id) REFERENCES org_unit(id))
               AUTO_INCREMENT = {first_id};
             CREATE TABLE lab (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(200) NOT NULL, pi_id INT NULL,
               active TINYINT(1) NOT NULL DEFAULT 1, is_temp TINYINT(1) NOT NULL DEFAULT 0,
               FOREIGN KEY (pi_id) REFERENCES users(id)) AUTO_INCREMENT = {first_id};
             CREATE TABLE equipment (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(200) NOT NULL, college VARCHAR(64))
               AUTO_INCREMENT = {first_id};
             CREATE TABLE user_lab (user_id INT NOT NULL, lab_id INT NOT NULL, PRIMARY KEY (user_id, lab_id),
               FOREIGN KEY (user_id) REFERENCES users(id), FOREIGN KEY (lab_id) REFERENCES lab(id));"
        ),
        Engine::Sqlite => format!(
            "CREATE TABLE org_unit (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, parent_id INTEGER REFERENCES org_unit(id));
             CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, email TEXT, active INTEGER NOT NULL DEFAULT 1,
               org_unit_id INTEGER REFERENCES org_unit(id), is_temp INTEGER NOT NULL DEFAULT 0, password_hash TEXT, phone TEXT);
             CREATE TABLE lab (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, pi_id INTEGER REFERENCES users(id),
               active INTEGER NOT NULL DEFAULT 1, is_temp INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE equipment (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, college TEXT);
             CREATE TABLE user_lab (user_id INTEGER NOT NULL REFERENCES users(id), lab_id INTEGER NOT NULL REFERENCES lab(id),
               PRIMARY KEY (user_id, lab_id));
             INSERT INTO sqlite_sequence (name, seq) VALUES ('org_unit', {n}), ('users', {n}), ('lab', {n}), ('equipment', {n});",
            n = first_id - 1
        ),
    }
}

/// A fresh database of `engine` for site `name`, with the LIMS schema.
pub async fn site_db(
    name: &'static str,
    engine: Engine,
    dir: &std::path::Path,
    first_id: u32,
) -> Option<SiteDb> {
    let (db, url, admin) = match engine {
        Engine::Sqlite => {
            let path = dir.join(format!("{name}.db"));
            let url = format!("sqlite://{}?mode=rwc", path.display());
            let db = Db::connect(&DatabaseConfig::from_url(RedactedUrl::parse(&url).unwrap()))
                .await
                .unwrap();
            (db, url, None)
        }
        Engine::Postgres | Engine::Mysql => {
            let admin_url = test_support::require(if engine == Engine::Postgres {
                "PG_URL"
            } else {
                "MYSQL_URL"
            })?;
            let admin = Db::connect(&DatabaseConfig::from_url(
                RedactedUrl::parse(&admin_url).unwrap(),
            ))
            .await
            .unwrap();
            let db_name = test_support::unique(&format!("sync_{name}")).replace('-', "_");
            sqlx::raw_sql(&format!("CREATE DATABASE {db_name}"))
                .execute(admin.pool())
                .await
                .unwrap();
            let mut url = url::Url::parse(&admin_url).unwrap();
            url.set_path(&format!("/{db_name}"));
            let db = Db::connect(&DatabaseConfig::from_url(RedactedUrl::new(url.clone())))
                .await
                .unwrap();
            (db, url.to_string(), Some((admin, db_name)))
        }
    };
    let site = SiteDb {
        name,
        db,
        url,
        admin,
    };
    site.exec(&schema(engine, first_id)).await;
    Some(site)
}

/// The sync configuration of the test sites.
pub fn sync_toml(exchange: &str, sites: &[&SiteDb], origin_site: &str) -> String {
    let mut t = String::new();
    for s in sites {
        writeln!(t, "[databases.{}]\nurl = \"{}\"\n", s.name, s.url).unwrap();
    }
    writeln!(
        t,
        "[sync]\nexchange = \"{exchange}\"\nmax_failures = 3\nbatch = 200\n"
    )
    .unwrap();
    for s in sites {
        write!(
            t,
            "[sync.sites.{n}]\ndatabase = \"{n}\"\nkey = \"signing-key-of-site-{n}\"\n",
            n = s.name
        )
        .unwrap();
        if s.name == origin_site {
            t.push_str("origin_columns = { equipment = \"college\" }\n");
        }
        t.push('\n');
    }
    t.push_str(
        r#"[sync.objects.org_unit]
table = "org_unit"
allow_delete = true
fields = { name = "name", parent = { column = "parent_id", ref = "org_unit" } }

[sync.objects.user]
table = "users"
active = "active"
temporary = "is_temp"
match = ["email"]
fields = { name = "name", email = "email", phone = "phone", active = { column = "active", type = "bool" }, org_unit = { column = "org_unit_id", ref = "org_unit" } }

[sync.objects.lab]
table = "lab"
active = "active"
temporary = "is_temp"
fields = { name = "name", active = { column = "active", type = "bool" }, pi = { column = "pi_id", ref = "user" } }

[sync.objects.equipment]
table = "equipment"
allow_delete = true
fields = { name = "name" }

[sync.links.user_lab]
table = "user_lab"
left = { column = "user_id", object = "user" }
right = { column = "lab_id", object = "lab" }
"#,
    );
    t
}

/// A configured set of sites.
pub struct World {
    pub exchange: String,
    /// The RabbitMQ URL, when not on the embedded queue.
    pub amqp: Option<String>,
    pub home: tempfile::TempDir,
    pub config: PathBuf,
    pub sites: Vec<SiteDb>,
}

impl World {
    /// Sites of the given engines (`a`, `b`, `c`) and a queue URL (None: embedded).
    pub async fn new(engines: &[Engine], amqp: Option<&str>) -> Option<World> {
        let home = test_support::tempdir();
        let names = ["a", "b", "c"];
        let mut sites = Vec::new();
        for (i, e) in engines.iter().enumerate() {
            let first = 100 * (u32::try_from(i).unwrap() + 1) + 7 * u32::try_from(i).unwrap();
            sites.push(site_db(names[i], *e, home.path(), first).await?);
        }
        let exchange = test_support::unique("sync");
        let refs: Vec<&SiteDb> = sites.iter().collect();
        let mut toml = format!(
            "[paths]\ndata_dir = \"{}\"\n\n[queue]\nurl = \"{}\"\nlease_secs = 5\n\n",
            home.path().join("data").display(),
            amqp.map_or_else(
                || format!("sqlite://{}", home.path().join("queue.db").display()),
                str::to_owned
            )
        );
        toml.push_str(&sync_toml(&exchange, &refs, "a"));
        toml = toml.replace("[queue]\n", "[queue]\nprefetch = 50\n");
        let config = test_support::write_config(home.path(), &toml);
        std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let w = World {
            exchange,
            amqp: amqp.map(str::to_owned),
            home,
            config,
            sites,
        };
        for s in &w.sites {
            w.ok(&["install", "--site", s.name]);
        }
        Some(w)
    }

    pub fn exchange(&self) -> String {
        self.exchange.clone()
    }

    pub fn site(&self, name: &str) -> &SiteDb {
        self.sites.iter().find(|s| s.name == name).unwrap()
    }

    /// Run the tool with this world's config.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        test_support::cli::run(BIN, self.home.path(), &all)
    }

    /// Run, expect exit 0, return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "sync-publish {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run with --json; the single record.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    }

    /// Relay every site, then let every site consume; twice, so parked changes and
    /// replies settle.
    pub fn sync(&self) {
        for _ in 0..2 {
            for s in &self.sites {
                self.ok(&["relay", "--site", s.name]);
            }
            for s in &self.sites {
                self.ok(&["consume", "--site", s.name, "--once"]);
            }
        }
    }

    /// Drop the sites' databases and, on RabbitMQ, the exchange and queues this world
    /// declared (a shared broker would otherwise collect them run after run).
    pub async fn drop(self) {
        if let Some(url) = &self.amqp {
            use labrelay::queue::{AnyBroker, Broker, BrokerSettings};
            let url = labrelay::secret::RedactedUrl::parse(url).unwrap();
            let broker = AnyBroker::connect(&url, &BrokerSettings::default())
                .await
                .unwrap();
            for s in &self.sites {
                let queue = format!("{}.{}", self.exchange, s.name);
                broker.delete_queue(&queue).await.unwrap();
                broker.delete_queue(&format!("{queue}.dead")).await.unwrap();
            }
            broker.delete_exchange(&self.exchange).await.unwrap();
            broker.close().await;
        }
        for s in self.sites {
            s.drop().await;
        }
    }
}
