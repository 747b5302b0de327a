//! Coordinators that survive each other through etcd: two campaign for a run, one leads; when
//! it is killed, the other takes over from its last commit and the workers find it there.
//! These tests need an `etcd` binary (Debian's etcd-server); without one they say so, and fail
//! when HOLDFAST_REQUIRE_ETCD is set (as CI sets it).

mod common;

/// Without the `etcd` feature there is no `--etcd` to test: said, and refused where required.
#[cfg(not(feature = "etcd"))]
#[test]
fn failover_through_etcd() {
    let why = "built without the etcd feature (cargo test --workspace --release --features holdfast/etcd)";
    assert!(
        std::env::var_os("HOLDFAST_REQUIRE_ETCD").is_none(),
        "HOLDFAST_REQUIRE_ETCD is set, but this test was {why}"
    );
    common::skipped(why);
}

#[cfg(feature = "etcd")]
mod failover {
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::mpsc::{Receiver, RecvTimeoutError};
    use std::time::{Duration, Instant};

    use super::common::{KillOnDrop, LIMIT, assert_exactly_once, jsonl, skipped};
    use holdfast_cluster::etcd::{LocalEtcd, local_etcd_unavailable};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// One run at a time: each is 6 to 8 processes on a 2-core machine, and the tests time
    /// failovers.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn etcd_or_skip() -> Option<LocalEtcd> {
        if let Some(why) = local_etcd_unavailable() {
            assert!(
                std::env::var_os("HOLDFAST_REQUIRE_ETCD").is_none(),
                "HOLDFAST_REQUIRE_ETCD is set, but {why}"
            );
            skipped(&why);
            return None;
        }
        Some(LocalEtcd::start().expect("a local etcd starts"))
    }

    /// What a loopback test holds while it runs (dropped in this order): a scratch directory,
    /// a local etcd, and its turn.
    struct Trial {
        dir: tempfile::TempDir,
        etcd: LocalEtcd,
        _turn: std::sync::MutexGuard<'static, ()>,
    }

    /// A trial, or None (said so) where there is no etcd.
    fn trial() -> Option<Trial> {
        let turn = serial();
        let etcd = etcd_or_skip()?;
        let dir = tempfile::tempdir().unwrap();
        Some(Trial {
            dir,
            etcd,
            _turn: turn,
        })
    }

    /// A loopback address nothing listens on now.
    fn free_addr() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    /// A coordinator process, with the lines it prints on stderr and when each came.
    struct Coordinator {
        process: KillOnDrop,
        lines: Receiver<(Instant, String)>,
    }

    impl Coordinator {
        fn start(d: &Path, etcd: &str, listen: &str, run: &str, shape: &[&str]) -> Coordinator {
            let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
                .args(["coordinator", "--etcd", etcd, "--listen", listen])
                .args(["--min-workers", "3", "--run-dir", run, "--no-progress"])
                .args(shape)
                .env("HOLDFAST_SECRET", SECRET)
                .current_dir(d)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let stderr = BufReader::new(child.stderr.take().unwrap());
            let (tx, lines) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in stderr.lines().map_while(Result::ok) {
                    let _ = tx.send((Instant::now(), line));
                }
            });
            Coordinator {
                process: KillOnDrop(child),
                lines,
            }
        }

        /// When it printed a line containing `needle`, waiting up to `limit`; `None` if it did
        /// not (or exited first).
        fn printed(&self, needle: &str, limit: Duration) -> Option<Instant> {
            let until = Instant::now() + limit;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok((at, line)) if line.contains(needle) => return Some(at),
                    Ok(_) => {}
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
                }
            }
        }

        fn exit_status(&mut self, limit: Duration) -> std::process::ExitStatus {
            let started = Instant::now();
            loop {
                if let Some(status) = self.process.0.try_wait().unwrap() {
                    return status;
                }
                assert!(started.elapsed() < limit, "the coordinator did not exit");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn start_workers(d: &Path, etcd: &str, run: &str) -> Vec<KillOnDrop> {
        let how = ["--etcd", etcd, "--run", run];
        super::common::start_workers(d, &how, SECRET, 3)
    }

    fn all_succeed(workers: Vec<KillOnDrop>) {
        for mut w in workers {
            let started = Instant::now();
            let status = loop {
                if let Some(s) = w.0.try_wait().unwrap() {
                    break s;
                }
                assert!(started.elapsed() < Duration::from_secs(60), "a worker hung");
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(status.success(), "a worker failed: {status}");
        }
    }

    /// The committed rounds in `run`'s ledger, in order.
    fn ledger_rounds(run: &Path) -> Vec<u64> {
        let text = std::fs::read_to_string(run.join("ledger.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["round"].as_u64().filter(|_| v.get("members").is_some()))
            .collect()
    }

    /// Waits until `run`'s ledger holds more than `rounds` rounds; when that happened.
    fn wait_for_rounds(run: &Path, rounds: usize, limit: Duration) -> Instant {
        let started = Instant::now();
        while ledger_rounds(run).len() <= rounds {
            assert!(started.elapsed() < limit, "no round committed in time");
            std::thread::sleep(Duration::from_millis(10));
        }
        Instant::now()
    }

    /// DiLoCo, 3 workers, 400 steps of H = 20: 20 rounds.
    const SHAPE: [&str; 8] = shape("400");
    /// Long enough for a worker stopped for 5 s to rejoin before the end: at 400 steps it ended
    /// first on an AVX2 machine that trains faster.
    const LONG_SHAPE: [&str; 8] = shape("800");

    /// The failover runs' training flags, with `steps` steps.
    const fn shape(steps: &'static str) -> [&'static str; 8] {
        [
            "--steps",
            steps,
            "--inner-steps",
            "20",
            "--batch-size",
            "32",
            "--seed",
            "7",
        ]
    }

    #[test]
    fn killing_the_leading_coordinator_hands_the_run_to_a_standby_and_it_ends_as_if_nothing_happened()
     {
        let Some(t) = trial() else {
            return;
        };
        let (d, ep) = (t.dir.path(), t.etcd.endpoint.as_str());
        run_whole(d, ep, &SHAPE);

        let (mut leader, mut standby, workers) = start_run(d, ep, "failed-over", &SHAPE);
        let run = d.join("failed-over");
        wait_for_rounds(&run, 3, LIMIT);
        let committed = ledger_rounds(&run).len();
        leader.process.0.kill().unwrap();
        let killed = Instant::now();
        leader.process.0.wait().unwrap();

        let led = standby.printed("leading run", Duration::from_secs(30));
        let led = led
            .expect("the standby leads")
            .saturating_duration_since(killed);
        assert!(
            led < Duration::from_secs(5),
            "the standby led {led:?} after the kill"
        );
        let next_commit = wait_for_rounds(&run, committed, LIMIT).saturating_duration_since(killed);
        assert!(standby.exit_status(LIMIT).success());
        all_succeed(workers);

        let rounds = ledger_rounds(&run);
        assert_eq!(rounds, (0..20).collect::<Vec<_>>(), "every round once");
        let took_over: Vec<_> = jsonl(&run.join("events.jsonl"))
            .into_iter()
            .filter(|e| e["detail"]["event"] == "took_over")
            .collect();
        assert_eq!(took_over.len(), 1, "{took_over:?}");
        assert_same_as_whole(d, "failed-over");
        // Past the harness's capture, for the record.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "failover: the standby led {led:?} and committed the next round {next_commit:?} after the leader was killed"
        );
    }

    /// Sends `signal` (`STOP`, `CONT`) to `worker`.
    fn signal(worker: &KillOnDrop, signal: &str) {
        let pid = worker.0.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status();
        assert!(sent.unwrap().success(), "kill -{signal} {pid}");
    }

    #[test]
    fn a_hung_worker_is_put_out_when_its_etcd_lease_lapses_and_rejoins_once_it_resumes() {
        let Some(t) = trial() else {
            return;
        };
        let (d, ep) = (t.dir.path(), t.etcd.endpoint.as_str());
        let mut leader = Coordinator::start(d, ep, &free_addr(), "hung", &LONG_SHAPE);
        assert!(leader.printed("leading run", LIMIT).is_some());
        let workers = start_workers(d, ep, "hung");
        let run = d.join("hung");
        wait_for_rounds(&run, 3, LIMIT);
        // Stopped, it neither renews its lease nor says a word, and its connection stays
        // open: only the lease's lapse (2 s) can put it out.
        signal(&workers[2], "STOP");
        std::thread::sleep(Duration::from_secs(5));
        signal(&workers[2], "CONT");
        assert!(leader.exit_status(LIMIT).success());
        all_succeed(workers);

        let events: Vec<serde_json::Value> = jsonl(&run.join("events.jsonl"))
            .into_iter()
            .map(|e| e["detail"].clone())
            .collect();
        let removed = events.iter().position(|e| {
            e["event"] == "removed"
                && e["name"] == "host-2"
                && e["reason"].as_str().unwrap().contains("etcd lease expired")
        });
        let removed = removed.unwrap_or_else(|| panic!("not put out by its lease: {events:?}"));
        let rejoined = events[removed..]
            .iter()
            .any(|e| e["event"] == "joined" && e["name"] == "host-2");
        assert!(rejoined, "it did not rejoin: {events:?}");
        assert_exactly_once(&run);
    }

    /// Run `run` of `shape` in `d`: a coordinator that leads it, one that stands by, and 3
    /// workers.
    fn start_run(
        d: &Path,
        ep: &str,
        run: &str,
        shape: &[&str],
    ) -> (Coordinator, Coordinator, Vec<KillOnDrop>) {
        let leader = Coordinator::start(d, ep, &free_addr(), run, shape);
        assert!(leader.printed("leading run", LIMIT).is_some());
        let standby = Coordinator::start(d, ep, &free_addr(), run, shape);
        assert!(standby.printed("standing by", LIMIT).is_some());
        (leader, standby, start_workers(d, ep, run))
    }

    /// The run of `shape` in `d`/whole, led by one coordinator throughout.
    fn run_whole(d: &Path, ep: &str, shape: &[&str]) {
        let mut whole = Coordinator::start(d, ep, &free_addr(), "whole", shape);
        let workers = start_workers(d, ep, "whole");
        assert!(whole.exit_status(LIMIT).success());
        all_succeed(workers);
    }

    /// `run` in `d` ended byte-identical to `d`/whole: model, AdamW moments, outer momentum.
    fn assert_same_as_whole(d: &Path, run: &str) {
        for file in [
            "model.safetensors",
            "optimizer.safetensors",
            "outer.safetensors",
        ] {
            let read = |run: &str| {
                let p = d.join(run).join("checkpoints/step-00000400").join(file);
                std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            };
            assert!(
                read("whole") == read(run),
                "{file}: {run} differs from the run that was never interrupted"
            );
        }
    }

    #[test]
    fn when_the_leader_and_every_worker_die_together_the_standby_restarts_from_the_checkpoint() {
        let Some(t) = trial() else {
            return;
        };
        let (d, ep) = (t.dir.path(), t.etcd.endpoint.as_str());
        let shape = [&SHAPE[..], &["--checkpoint-every", "100"]].concat();
        run_whole(d, ep, &shape);

        let (mut leader, mut standby, workers) = start_run(d, ep, "all-lost", &shape);
        let run = d.join("all-lost");
        while !run.join("checkpoints/step-00000100").is_dir() {
            assert!(
                leader.process.0.try_wait().unwrap().is_none(),
                "the run ended first"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Every process that held the state, at once.
        drop(workers);
        leader.process.0.kill().unwrap();
        leader.process.0.wait().unwrap();

        let workers = start_workers(d, ep, "all-lost");
        assert!(standby.printed("restarting cold", LIMIT).is_some());
        assert!(standby.exit_status(LIMIT).success());
        all_succeed(workers);
        assert_eq!(
            ledger_rounds(&run),
            (0..20).collect::<Vec<_>>(),
            "every round once"
        );
        let events: Vec<String> = jsonl(&run.join("events.jsonl"))
            .iter()
            .filter_map(|e| e["detail"]["event"].as_str().map(String::from))
            .collect();
        assert!(
            events.contains(&"took_over".into()) && events.contains(&"restarted_cold".into()),
            "{events:?}"
        );
        assert_same_as_whole(d, "all-lost");
    }

    /// `bench/hosts.sh run DIR FAULT` (3 etcd members, 2 coordinators, 3 workers in namespaces
    /// of their own) on a 240-step run: the line it printed, or None where namespaces cannot be
    /// made here (said so, and refused under HOLDFAST_REQUIRE_ETCD).
    /// A `bench/hosts.sh` run of `steps` per worker with `fault` (its environment: `env`).
    fn hosts_run(fault: &str, steps: u64, env: &[(&str, &str)]) -> Option<serde_json::Value> {
        let dir = tempfile::tempdir().unwrap();
        let tag: String = fault.split('-').map(|w| &w[..2]).collect();
        let prefix = format!("hfh{tag}{}", std::process::id());
        let _cleanup = super::common::Namespaces {
            script: "hosts.sh",
            var: "HOSTS_PREFIX",
            prefix: prefix.clone(),
        };
        let mut cmd = Command::new("bash");
        cmd.arg(super::common::bench_script("hosts.sh"))
            .args(["run", dir.path().to_str().unwrap(), fault])
            .args(["--steps", &steps.to_string()])
            .args(["--inner-steps", "20", "--batch-size", "32"])
            .env("HOLDFAST", env!("CARGO_BIN_EXE_holdfast"))
            .env("HOSTS_PREFIX", &prefix)
            .envs(env.iter().copied());
        let out = super::common::bounded(cmd, Duration::from_secs(200));
        if out.status.code() == Some(3) {
            let why = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(
                std::env::var_os("HOLDFAST_REQUIRE_ETCD").is_none(),
                "HOLDFAST_REQUIRE_ETCD is set and the hosts cannot be made: {why}"
            );
            skipped(&why);
            return None;
        }
        let line = super::common::ok(&out);
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
        let logs = |host: u32| {
            let log = dir.path().join(format!("logs/coordinator-{host}.log"));
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(6)..].join("\n")
        };
        let context =
            serde_json::json!({"result": &v, "leader_log": logs(4), "standby_log": logs(5)});
        // 3 workers × `steps`: each batch committed once, and the rounds 0..n once (a round a
        // fault cut short takes one more).
        assert_eq!(
            (v["batches"].as_u64(), v["batches_once"].as_bool()),
            (Some(3 * steps), Some(true)),
            "{context:#}"
        );
        assert_eq!(v["rounds_once"].as_bool(), Some(true), "{context:#}");
        // The replicas' states agreed on every round, and all 3 started the last one from the
        // same state (its sum is applied alike, so they end alike).
        assert_eq!(v["states_agree"].as_bool(), Some(true), "{context:#}");
        assert_eq!(
            (
                v["last_round_replicas"].as_u64(),
                v["last_round_states_equal"].as_bool()
            ),
            (Some(3), Some(true)),
            "{context:#}"
        );
        Some(v)
    }

    #[test]
    fn on_separate_hosts_a_killed_leader_is_replaced_within_five_seconds() {
        let _serial = serial();
        let Some(v) = hosts_run("kill-leader", 240, &[]) else {
            return;
        };
        let led = v["led_after_s"].as_f64().expect("the standby led");
        assert!(led < 5.0, "{v}");
        assert_eq!(v["second_exit"].as_u64(), Some(0), "{v}");
    }

    #[test]
    fn on_separate_hosts_a_run_survives_losing_the_etcd_leader() {
        let _serial = serial();
        let Some(v) = hosts_run("kill-etcd-leader", 240, &[]) else {
            return;
        };
        // One of the coordinators finished the run; the other stood by (or stepped down
        // while etcd elected a new leader, and the standby took over).
        let exits = [v["first_exit"].as_u64(), v["second_exit"].as_u64()];
        assert!(exits.contains(&Some(0)), "{v}");
        // A dead member costs the etcd client retries: no worker failed to register its lease
        // with the standby and was put out of a round for it.
        assert_eq!(v["removed"], serde_json::json!([]), "{v}");
    }

    #[test]
    fn on_separate_hosts_a_leader_cut_off_from_etcd_stops_and_the_standby_takes_over() {
        let _serial = serial();
        let Some(v) = hosts_run("cut-leader", 240, &[]) else {
            return;
        };
        assert!(v["led_after_s"].as_f64().is_some(), "{v}");
        assert_ne!(
            v["first_exit"].as_u64(),
            Some(0),
            "the cut-off leader stops: {v}"
        );
        assert_eq!(v["second_exit"].as_u64(), Some(0), "{v}");
    }

    #[test]
    fn on_separate_hosts_a_worker_cut_off_past_its_lease_is_put_out_and_rejoins_once_healed() {
        let _serial = serial();
        let Some(v) = hosts_run("cut-worker", 480, &[("CUT_FOR", "3")]) else {
            return;
        };
        let removed = v["worker_8_removed"].as_str().unwrap_or_default();
        assert!(removed.contains("etcd lease expired"), "{v}");
        assert_eq!(v["worker_8_rejoined"].as_bool(), Some(true), "{v}");
        assert_eq!(v["first_exit"].as_u64(), Some(0), "{v}");
    }
}
