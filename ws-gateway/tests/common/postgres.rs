//! A real PostgreSQL server for tests (Debian's `postgresql` package, installed by
//! `scripts/setup.sh`): a new cluster in a temporary directory, on a free port of 127.0.0.1,
//! with trust authentication for the user `lookout` and no fsync (tests never need durability
//! across a power loss).
//!
//! The server is run by a small shell that reads commands on its standard input (`stop`,
//! `start`: an outage and its end) and removes the cluster when that input closes, so the
//! server goes with the test process however it ends (a panic, a `kill -9`). As root (CI), the
//! shell runs as the `postgres` user, since PostgreSQL refuses to run as root.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

const SCRIPT: &str = r#"
set -e
B=$1; D=$2; P=$3
"$B/initdb" -D "$D/data" -U lookout --auth=trust -E UTF8 --no-sync >"$D/initdb.log" 2>&1
start() {
  "$B/pg_ctl" -D "$D/data" -l "$D/server.log" -w -o "-p $P -k $D -c listen_addresses=127.0.0.1 -c fsync=off \
    -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" start >/dev/null
}
start; echo ready
while read -r cmd; do
  case "$cmd" in
    stop) "$B/pg_ctl" -D "$D/data" -m fast -w stop >/dev/null; echo stopped ;;
    start) start; echo ready ;;
  esac
done
"$B/pg_ctl" -D "$D/data" -m immediate stop >/dev/null 2>&1 || true
rm -rf "$D"
"#;

/// A running PostgreSQL server; dropping it stops the server and removes its files.
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    io: Mutex<Option<(ChildStdin, BufReader<ChildStdout>)>>,
    child: Mutex<Child>,
}

/// The newest PostgreSQL's programs.
fn bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run scripts/setup.sh")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|d| d.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()).unwrap_or(0));
    dirs.pop().expect("no initdb under /usr/lib/postgresql/*/bin: run scripts/setup.sh")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.trim_ascii() == b"0").unwrap_or(false)
}

impl Postgres {
    /// Starts a new server and waits until it accepts connections.
    pub fn start() -> Postgres {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lookout-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bin = bin_dir();
        let port = free_port();
        let args = ["-c", SCRIPT, "pg", bin.to_str().unwrap(), dir.to_str().unwrap()];
        let mut cmd = if is_root() {
            let out = Command::new("id").args(["-u", "postgres"]).output().unwrap();
            let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("no postgres user");
            let out = Command::new("id").args(["-g", "postgres"]).output().unwrap();
            let gid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh"]);
            c
        } else {
            Command::new("sh")
        };
        let mut child = cmd
            .args(args)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot start PostgreSQL's shell");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let pg = Postgres { port, bin, dir, io: Mutex::new(Some((stdin, stdout))), child: Mutex::new(child) };
        pg.expect("ready");
        pg
    }

    fn expect(&self, what: &str) {
        let mut io = self.io.lock().unwrap();
        let mut line = String::new();
        io.as_mut().unwrap().1.read_line(&mut line).unwrap();
        if line.trim() != what {
            let log = std::fs::read_to_string(self.dir.join("server.log"))
                .or_else(|_| std::fs::read_to_string(self.dir.join("initdb.log")))
                .unwrap_or_default();
            panic!("PostgreSQL did not get {what}: {line:?}\n{log}");
        }
    }

    fn command(&self, cmd: &str, answer: &str) {
        {
            let mut io = self.io.lock().unwrap();
            let stdin = &mut io.as_mut().unwrap().0;
            writeln!(stdin, "{cmd}").unwrap();
            stdin.flush().unwrap();
        }
        self.expect(answer);
    }

    /// Stops the server (an outage: connections break, new ones are refused).
    pub fn stop(&self) {
        self.command("stop", "stopped");
    }

    /// Starts it again after [`Postgres::stop`].
    pub fn restart(&self) {
        self.command("start", "ready");
    }

    /// Runs SQL as the superuser in database `db`.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "lookout", "-d", db, "-qAtX", "-c", sql])
            .output()
            .expect("cannot run psql");
        assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new, empty database; its URL.
    pub fn database(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("t{}", N.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        format!("postgres://lookout@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Closing the shell's input stops the server and removes the cluster.
        drop(self.io.lock().unwrap().take());
        let _ = self.child.lock().unwrap().wait();
    }
}

/// One server for a whole test binary (stopped when the binary exits: its input closes).
pub fn shared() -> &'static Postgres {
    static PG: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();
    PG.get_or_init(Postgres::start)
}
