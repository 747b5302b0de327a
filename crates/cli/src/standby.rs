//! `holdfast coordinator --etcd`: coordinators that survive each other. Every coordinator of a
//! run campaigns in etcd; the one that leads records where the run stands with every commit,
//! guarded by its leadership, before any worker hears of it. When it dies, its lease expires,
//! a standby leads, reads that record and takes over: the workers find it through etcd and
//! rejoin with the states they hold.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use holdfast_cluster::coordinator::{Durable, Liveness};
use holdfast_cluster::etcd::{self, Etcd, Leadership};
use holdfast_cluster::membership::member_leases;
use holdfast_cluster::server::{LeaseChanges, Recorder};
use holdfast_train::coordinate::{ClusterRun, ControlPlane, Fence, Start};
use holdfast_train::run;

use super::{
    CoordinatorArgs, cold_restart_attempt, coordinate, device, launch, new_cluster_run, overrides,
    restore_cluster_run, resume_command,
};

/// How long a dead leader's lease outlives it: a standby leads that long after. A live leader
/// steps down when it could not renew for three quarters of it (2.25 s), which an etcd
/// electing a new leader of its own must not take.
const LEADER_TTL: Duration = Duration::from_secs(3);

/// Coordinates the run of `args` as one of its coordinators in the etcd at `endpoints`.
pub fn cmd_coordinator_etcd(args: &CoordinatorArgs, endpoints: &[String]) -> Result<()> {
    let run_dir = args.train.run_dir.clone().ok_or_else(|| {
        anyhow!(
            "etcd (--etcd or sync.etcd) needs --run-dir: the run directory the coordinators share"
        )
    })?;
    let name = run_name(&run_dir)?;
    check_advertised(&args.listen)?;
    let secret = launch::secret_from_env_or_file(args.secret_file.as_ref())?;
    let device = device::parse(&args.train.device)?;
    eprintln!(
        "standing by for run {name}: campaigning in etcd {}",
        endpoints.join(",")
    );
    let leadership = Arc::new(lead(endpoints, &name, &args.listen)?);
    eprintln!("leading run {name}");
    if leadership.etcd().get(&etcd::finished_key(&name))?.is_some() {
        eprintln!("run {name} is already finished");
        return Ok(());
    }
    let (cfg, prepared, mut start) = how_to_start(args, &run_dir, leadership.etcd(), &name)?;
    let mut restarts = 0;
    loop {
        let cluster = ClusterRun::start(
            &run_dir,
            &cfg,
            &prepared.model,
            &args.listen,
            &secret,
            args.min_workers,
            device.clone(),
            start,
            Some(&EtcdPlane {
                leadership: leadership.clone(),
                name: name.clone(),
            }),
        )?
        .fenced_by(fence(leadership.clone(), &name));
        let Some(rounds) = coordinate(cluster, args, (&run_dir, &cfg, &prepared))? else {
            break;
        };
        // No worker came back with the state (they died with the leader, say): the newest
        // checkpoint, like a launcher that lost every replica.
        let resume = resume_command(&args.listen, args, &run_dir);
        restarts = cold_restart_attempt(&run_dir, rounds, restarts, &cfg, &resume)?;
        let (_, _, restore) = restore_cluster_run(&run_dir, &overrides(&args.train)?, &device)?;
        start = Start::Restore(Box::new(restore));
    }
    leadership.put(
        &etcd::finished_key(&name),
        run_dir.display().to_string().as_bytes(),
    )?;
    Ok(())
}

/// What the new leader of run `name` starts from: the last leader's record (taking over), or
/// a fresh start in the run directory (made here when no leader made it yet).
fn how_to_start(
    args: &CoordinatorArgs,
    run_dir: &Path,
    etcd: &Etcd,
    name: &str,
) -> Result<(holdfast_train::RunConfig, run::Prepared, Start)> {
    Ok(match read_durable(etcd, name)? {
        Some(d) => {
            let (cfg, prepared) = existing_run(run_dir).with_context(|| {
                format!("run {name} has committed rounds in etcd; its coordinators must share its run directory")
            })?;
            (cfg, prepared, Start::TakeOver(d))
        }
        // A leader that died before its first commit left the directory behind.
        None if run_dir.exists() => {
            let (cfg, prepared) = existing_run(run_dir)?;
            (cfg, prepared, Start::Fresh)
        }
        None => {
            let (_, cfg, prepared) = new_cluster_run(&args.train)?;
            (cfg, prepared, Start::Fresh)
        }
    })
}

/// Campaigns until this coordinator leads run `name`. An etcd that cannot be reached at all
/// is an error (a wrong endpoint does not mend); a campaign cut short (the etcd member it
/// spoke to died, say) is tried again.
fn lead(endpoints: &[String], name: &str, listen: &str) -> Result<Leadership> {
    let mut etcd = Etcd::connect(endpoints)?;
    loop {
        match etcd.campaign(&etcd::election_key(name), listen, LEADER_TTL) {
            Ok(leadership) => return Ok(leadership),
            Err(e) => tracing::warn!("campaigning for run {name}: {e}; again in 1 s"),
        }
        etcd = loop {
            std::thread::sleep(Duration::from_secs(1));
            match Etcd::connect(endpoints) {
                Ok(etcd) => break etcd,
                Err(e) => tracing::warn!("campaigning for run {name}: {e}; again in 1 s"),
            }
        };
    }
}

/// The run's name in etcd: its directory's name.
fn run_name(run_dir: &Path) -> Result<String> {
    let name = run_dir.file_name().and_then(|n| n.to_str());
    match name {
        Some(n) if !n.is_empty() && !n.contains('/') => Ok(n.to_string()),
        _ => bail!(
            "--run-dir {}: its last component names the run in etcd, and must be plain UTF-8",
            run_dir.display()
        ),
    }
}

/// The leader's address is what workers connect to: it must be one they can reach.
fn check_advertised(listen: &str) -> Result<()> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| anyhow!("--listen {listen}: {e}"))?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        bail!(
            "--listen {listen}: with --etcd it is the address workers find the leader at, so it needs a specific IP and port"
        );
    }
    Ok(())
}

fn existing_run(run_dir: &Path) -> Result<(holdfast_train::RunConfig, run::Prepared)> {
    let cfg = run::read_run_config(run_dir)?;
    let prepared = run::prepare_data(
        &cfg,
        &run::token_cache_dir(run_dir),
        run::run_tokenizer(run_dir).as_deref(),
    )?;
    Ok((cfg, prepared))
}

/// Where the last leader left the run, if it committed anything.
fn read_durable(etcd: &Etcd, name: &str) -> Result<Option<Durable>> {
    let key = etcd::durable_key(name);
    let Some(bytes) = etcd.get(&key)? else {
        return Ok(None);
    };
    let d = serde_json::from_slice(&bytes).with_context(|| format!("etcd key {key}"))?;
    Ok(Some(d))
}

/// Says why this coordinator may no longer write the run directory once it lost its lease.
fn fence(leadership: Arc<Leadership>, name: &str) -> Fence {
    let why = format!(
        "no longer the leader of run {name}: its etcd lease could not be renewed, so a standby takes over"
    );
    Box::new(move || leadership.lost().then(|| why.clone()))
}

/// Run `name`'s etcd, as its leader sees it.
struct EtcdPlane {
    leadership: Arc<Leadership>,
    name: String,
}

impl ControlPlane for EtcdPlane {
    fn recorder(&self) -> Recorder {
        recorder(self.leadership.clone(), &self.name)
    }

    /// The workers keep leases under a prefix of this leader's and this run id's own, which
    /// the leader watches.
    fn follow_members(&self, run_id: u64) -> (Liveness, LeaseChanges) {
        let prefix = etcd::members_prefix(&self.name, self.leadership.lease(), run_id);
        let watch = self.leadership.etcd().watch_prefix(&prefix);
        let leases = member_leases(watch, prefix.clone());
        (Liveness::Lease { prefix }, leases)
    }
}

/// Records each change of where the run stands under the run's key, only while leading.
fn recorder(leadership: Arc<Leadership>, name: &str) -> Recorder {
    let key = etcd::durable_key(name);
    Box::new(move |d: &Durable| {
        let bytes = serde_json::to_vec(d).expect("json");
        leadership.put(&key, &bytes).map_err(|e| e.to_string())
    })
}
