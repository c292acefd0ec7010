//! `lookout serve` as a child process (the real binary): started, waited for until it says it
//! listens, its later log lines kept or drained (a full pipe would block it).
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// Spawns `cmd` (a `lookout serve …`) and returns once it listens; its log lines after that go
/// to `log` when given.
pub fn spawn_listening(mut cmd: Command, log: Option<Arc<Mutex<Vec<String>>>>) -> Child {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("cannot start lookout");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "lookout exited before listening");
    }
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(log) = &log {
                log.lock().unwrap().push(line);
            }
        }
    });
    child
}
