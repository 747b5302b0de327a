//! Checkpoints: `RUN/checkpoints/step-NNNNNNNN/` holding
//! - `model.safetensors`: weights, Hugging Face names and layout (loads in `transformers`),
//! - `config.json`: the Hugging Face config for those weights,
//! - `optimizer.safetensors`: AdamW moments (`NAME.exp_avg`, `NAME.exp_avg_sq`),
//! - `manifest.json`: format version, step, data cursor, RNG, run config and the BLAKE3 and size
//!   of every other file,
//! - `outer.safetensors` (multi-worker runs): DiLoCo's outer momentum,
//! - `workers.safetensors` (DiLoCo runs): each worker's own inner state ([`OwnState`]), so
//!   that a run restarted cold continues every worker exactly where it stood,
//! - `manifest.blake3`: the BLAKE3 of `manifest.json` (from format 2), so that an edit of the
//!   manifest itself is caught too.
//!
//! A checkpoint is built in a temporary directory, every file fsynced, then renamed into place,
//! so a crash leaves either the whole checkpoint or none; re-saving a step swaps the new
//! directory for the old in one rename (Linux `renameat2` with `RENAME_EXCHANGE`). Loading verifies every checksum; a
//! damaged latest checkpoint is reported by name and the previous good one is used.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use holdfast_model::{HostTensor, ModelConfig, Weights, st};

use crate::data::DataCursor;
use crate::optim::AdamW;
use crate::replica::OwnState;
use crate::state::TrainState;
use crate::{RunConfig, TrainError, atomic_write, sync_dir};

pub const FORMAT_VERSION: u32 = 2;
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const HF_CONFIG_FILE: &str = "config.json";
const MANIFEST_FILE: &str = "manifest.json";
const MANIFEST_SUM_FILE: &str = "manifest.blake3";
const OUTER_FILE: &str = "outer.safetensors";
const WORKERS_FILE: &str = "workers.safetensors";
const WORKERS_FORMAT: &str = "holdfast-workers-1";
/// Bounds on what `workers.safetensors` may declare, checked before anything is built.
const MAX_WORKERS: usize = 4096;
const MAX_FRAGMENTS: usize = 4096;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub blake3: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// The sampler is counter-based: row `i` uses `splitmix64(seed ^ splitmix64(i))`.
    pub algorithm: String,
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub step: u64,
    pub cursor: DataCursor,
    pub rng: RngState,
    pub optimizer_steps: u64,
    pub model: ModelConfig,
    pub run: RunConfig,
    pub files: BTreeMap<String, FileEntry>,
    /// Present in checkpoints of multi-worker runs: where the run's rounds and data stand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterPosition>,
}

/// What a multi-worker run needs, beyond weights and AdamW moments, to restart cold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterPosition {
    /// The round this state starts.
    pub next_round: u64,
    /// Batch ids below this have been handed out; those in `pending_batches` are not yet
    /// committed (their trainer failed) and are trained first.
    pub next_fresh_batch: u64,
    pub pending_batches: Vec<u64>,
    /// BLAKE3 of the replica state (outer weights and momentum, see `Replica::state_hash`):
    /// with the vote on, the hash a majority of replicas reported. Checked on a cold restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_blake3: Option<String>,
}

/// The multi-worker extras of a checkpoint: its position, DiLoCo's outer momentum (flat, in
/// parameter order and device layout; empty for DDP), stored in `outer.safetensors`, and
/// DiLoCo workers' own states (`workers.safetensors`; none in DDP, whose replicas hold the
/// same inner state).
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterExtras {
    pub position: ClusterPosition,
    pub outer_velocity: Vec<f32>,
    pub workers: Vec<OwnState>,
}

/// What `workers.safetensors`'s metadata says of each worker; tensor `I.NAME` is worker I's.
#[derive(Serialize, Deserialize)]
struct WorkerEntry {
    name: String,
    adam_t: u64,
    local: bool,
    residuals: usize,
}

fn workers_bytes(workers: &[OwnState]) -> Result<Vec<u8>, TrainError> {
    let mut tensors = Vec::new();
    let mut entries = Vec::new();
    let mut add = |name: String, data: &[f32]| {
        tensors.push(HostTensor {
            name,
            shape: vec![data.len()],
            data: data.to_vec(),
        })
    };
    for (i, w) in workers.iter().enumerate() {
        add(format!("{i}.exp_avg"), &w.exp_avg);
        add(format!("{i}.exp_avg_sq"), &w.exp_avg_sq);
        if let Some(local) = &w.local {
            add(format!("{i}.local"), local);
        }
        for (f, r) in w.residuals.iter().enumerate() {
            add(format!("{i}.residual.{f}"), r);
        }
        entries.push(WorkerEntry {
            name: w.name.clone(),
            adam_t: w.adam_t,
            local: w.local.is_some(),
            residuals: w.residuals.len(),
        });
    }
    let meta = BTreeMap::from([
        ("format".to_string(), WORKERS_FORMAT.to_string()),
        (
            "workers".to_string(),
            serde_json::to_string(&entries).expect("json serialises"),
        ),
    ]);
    Ok(st::serialize(&tensors, meta)?)
}

/// Reads `workers.safetensors` of a model of `n` parameters, checking every count and length.
fn parse_workers(bytes: &[u8], n: usize) -> Result<Vec<OwnState>, String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(WORKERS_FORMAT) {
        return Err(format!("not a {WORKERS_FORMAT} file"));
    }
    let entries: Vec<WorkerEntry> = meta
        .get("workers")
        .and_then(|w| serde_json::from_str(w).ok())
        .ok_or("metadata `workers` missing or not a list of workers")?;
    if entries.len() > MAX_WORKERS {
        return Err(format!("{} workers, at most {MAX_WORKERS}", entries.len()));
    }
    let get = |name: String, exact: bool| -> Result<Vec<f32>, String> {
        let t = st.tensor(&name).map_err(|e| format!("{name}: {e}"))?;
        let v = st::f32_from_le_bytes(t.data());
        if t.dtype() != safetensors::tensor::Dtype::F32 || v.len() > n || (exact && v.len() != n) {
            return Err(format!(
                "{name} is {:?} with {} values; the model has {n} parameters",
                t.dtype(),
                v.len()
            ));
        }
        Ok(v)
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        if e.name.is_empty() || !seen.insert(e.name.clone()) {
            return Err(format!(
                "worker {i} has an empty or repeated name {:?}",
                e.name
            ));
        }
        if e.residuals > MAX_FRAGMENTS {
            return Err(format!("worker {i} declares {} residuals", e.residuals));
        }
        out.push(OwnState {
            exp_avg: get(format!("{i}.exp_avg"), true)?,
            exp_avg_sq: get(format!("{i}.exp_avg_sq"), true)?,
            adam_t: e.adam_t,
            local: e
                .local
                .then(|| get(format!("{i}.local"), true))
                .transpose()?,
            residuals: (0..e.residuals)
                .map(|f| get(format!("{i}.residual.{f}"), false))
                .collect::<Result<_, _>>()?,
            name: e.name,
        });
    }
    Ok(out)
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Checkpoint directories of a run, newest first.
pub fn list(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort_by_key(|c| std::cmp::Reverse(c.0));
    found
}

/// Writes a checkpoint of `state` atomically and keeps only the newest `keep`.
pub fn save(
    run_dir: &Path,
    state: &TrainState,
    run: &RunConfig,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    save_with(run_dir, state, run, keep, None)
}

fn outer_bytes(velocity: &[f32]) -> Result<Vec<u8>, TrainError> {
    let t = HostTensor {
        name: "outer_velocity".into(),
        shape: vec![velocity.len()],
        data: velocity.to_vec(),
    };
    Ok(st::serialize(&[t], BTreeMap::new())?)
}

/// [`save`], with a multi-worker run's extras.
pub fn save_with(
    run_dir: &Path,
    state: &TrainState,
    run: &RunConfig,
    keep: usize,
    cluster: Option<&ClusterExtras>,
) -> Result<PathBuf, TrainError> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let name = step_dir_name(state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    // A process killed mid-write leaves its temporary directory behind: never a checkpoint
    // (only `step-*` are), but worth removing.
    let ours = format!("-{}", std::process::id());
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.filter_map(Result::ok) {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(".tmp-") && !n.ends_with(&ours) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| TrainError::io(&tmp, e))?;

    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let model_bytes = st::serialize(&state.weights.to_host(), meta.clone())?;
    let opt_bytes = st::serialize(&state.optimizer_host(), meta)?;
    let hf_config =
        serde_json::to_vec_pretty(&state.weights.cfg.to_hf_config_json()).expect("json serialises");

    let outer = cluster
        .map(|c| outer_bytes(&c.outer_velocity))
        .transpose()?;
    let workers = cluster
        .filter(|c| !c.workers.is_empty())
        .map(|c| workers_bytes(&c.workers))
        .transpose()?;
    let mut files = BTreeMap::new();
    let mut contents = vec![
        (MODEL_FILE, &model_bytes),
        (OPTIMIZER_FILE, &opt_bytes),
        (HF_CONFIG_FILE, &hf_config),
    ];
    if let Some(b) = &outer {
        contents.push((OUTER_FILE, b));
    }
    if let Some(b) = &workers {
        contents.push((WORKERS_FILE, b));
    }
    for (file, bytes) in contents {
        atomic_write(&tmp.join(file), bytes)?;
        files.insert(
            file.to_string(),
            FileEntry {
                blake3: blake3::hash(bytes).to_hex().to_string(),
                bytes: bytes.len() as u64,
            },
        );
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step: state.step,
        cursor: state.cursor,
        rng: RngState {
            algorithm: "splitmix64-counter".into(),
            seed: state.seed,
        },
        optimizer_steps: state.opt.t,
        model: state.weights.cfg.clone(),
        run: run.clone(),
        files,
        cluster: cluster.map(|c| c.position.clone()),
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).expect("json serialises");
    atomic_write(&tmp.join(MANIFEST_FILE), &manifest_bytes)?;
    let sum = format!("{}\n", blake3::hash(&manifest_bytes).to_hex());
    atomic_write(&tmp.join(MANIFEST_SUM_FILE), sum.as_bytes())?;

    let dest = root.join(&name);
    install_dir(&tmp, &dest)?;
    sync_dir(&root)?;

    for (_, old) in list(run_dir).into_iter().skip(keep) {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    Ok(dest)
}

/// Puts the directory `new` at `dest`. Re-saving a step (a resumed run reaching it again)
/// swaps the new copy for the old in one step, then removes the old: a crash leaves one of
/// the two at `dest`, never neither.
fn install_dir(new: &Path, dest: &Path) -> Result<(), TrainError> {
    if !dest.exists() {
        return std::fs::rename(new, dest).map_err(|e| TrainError::io(dest, e));
    }
    match exchange(new, dest) {
        Ok(()) => std::fs::remove_dir_all(new).map_err(|e| TrainError::io(new, e)),
        // A file system without the exchange: remove, then rename (a crash between the two
        // loses this step's old copy; the previous checkpoints remain).
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOSYS) =>
        {
            std::fs::remove_dir_all(dest).map_err(|e| TrainError::io(dest, e))?;
            std::fs::rename(new, dest).map_err(|e| TrainError::io(dest, e))
        }
        Err(e) => Err(TrainError::io(dest, e)),
    }
}

/// Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are NUL-terminated and outlive the call. The raw syscall, because
    // glibc's wrapper is newer than some systems this runs on.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

/// Checks `manifest.json`'s bytes against `manifest.blake3`, which format 2 requires.
fn verify_manifest_sum(dir: &Path, text: &[u8], format_version: u32) -> Result<(), String> {
    let sum = match std::fs::read_to_string(dir.join(MANIFEST_SUM_FILE)) {
        Ok(sum) => sum,
        Err(_) if format_version < 2 => return Ok(()),
        Err(e) => return Err(format!("cannot read {MANIFEST_SUM_FILE}: {e}")),
    };
    let hash = blake3::hash(text).to_hex().to_string();
    if sum.trim() != hash {
        return Err(format!(
            "{MANIFEST_FILE} is corrupt: BLAKE3 {hash} does not match {MANIFEST_SUM_FILE}'s {}",
            sum.trim()
        ));
    }
    Ok(())
}

/// Reads and verifies one checkpoint directory.
pub fn load_dir(dir: &Path, device: &Device) -> Result<(TrainState, Manifest), TrainError> {
    load_dir_with_extras(dir, device).map(|(s, m, _)| (s, m))
}

/// [`load_dir`], also returning a multi-worker checkpoint's extras.
pub fn load_dir_with_extras(
    dir: &Path,
    device: &Device,
) -> Result<(TrainState, Manifest, Option<ClusterExtras>), TrainError> {
    let bad =
        |what: String| TrainError::Checkpoint(format!("checkpoint {}: {what}", dir.display()));
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&manifest_path)
        .map_err(|e| bad(format!("cannot read {MANIFEST_FILE}: {e}")))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("{MANIFEST_FILE} is not a valid manifest: {e}")))?;
    if !(1..=FORMAT_VERSION).contains(&manifest.format_version) {
        return Err(bad(format!(
            "format version {} is not supported (this build reads 1 to {FORMAT_VERSION})",
            manifest.format_version
        )));
    }
    verify_manifest_sum(dir, &text, manifest.format_version).map_err(bad)?;
    manifest
        .model
        .validate()
        .map_err(|e| bad(format!("{MANIFEST_FILE}: {e}")))?;
    let contents = read_verified(dir, &manifest).map_err(bad)?;
    let source = |f: &str| dir.join(f).display().to_string();
    let named = st::deserialize(&contents[MODEL_FILE], &source(MODEL_FILE))?;
    let weights = Weights::from_named(&manifest.model, named, &source(MODEL_FILE), device)?;
    let mut moments = st::deserialize(&contents[OPTIMIZER_FILE], &source(OPTIMIZER_FILE))?;
    let mut take = |spec: &holdfast_model::ParamSpec, suffix: &str| {
        let key = format!("{}.{suffix}", spec.name);
        let t: HostTensor = moments
            .remove(&key)
            .ok_or_else(|| bad(format!("{OPTIMIZER_FILE} lacks '{key}'")))?;
        if t.shape != spec.hf_shape {
            return Err(bad(format!(
                "{OPTIMIZER_FILE}: '{key}' has shape {:?}",
                t.shape
            )));
        }
        Ok(holdfast_model::weights::from_host(spec, t.data, device))
    };
    let mut exp_avg = Vec::new();
    let mut exp_avg_sq = Vec::new();
    for spec in &weights.specs {
        exp_avg.push(take(spec, "exp_avg")?);
        exp_avg_sq.push(take(spec, "exp_avg_sq")?);
    }
    let state = TrainState {
        weights,
        opt: AdamW {
            exp_avg,
            exp_avg_sq,
            t: manifest.optimizer_steps,
        },
        step: manifest.step,
        cursor: manifest.cursor,
        seed: manifest.rng.seed,
    };
    let n: usize = state.weights.specs.iter().map(|s| s.numel()).sum();
    let extras = match (contents.get(OUTER_FILE), &manifest.cluster) {
        (Some(outer), Some(position)) => Some(ClusterExtras {
            position: position.clone(),
            outer_velocity: parse_velocity(outer, n)
                .map_err(|e| bad(format!("{OUTER_FILE}: {e}")))?,
            workers: match contents.get(WORKERS_FILE) {
                None => Vec::new(),
                Some(bytes) => {
                    parse_workers(bytes, n).map_err(|e| bad(format!("{WORKERS_FILE}: {e}")))?
                }
            },
        }),
        _ => None,
    };
    Ok((state, manifest, extras))
}

/// The files `manifest` requires of a checkpoint in `dir`, each checked against the size and
/// BLAKE3 the manifest gives for it.
fn read_verified(
    dir: &Path,
    manifest: &Manifest,
) -> Result<HashMap<&'static str, Vec<u8>>, String> {
    let mut required = vec![MODEL_FILE, OPTIMIZER_FILE, HF_CONFIG_FILE];
    if manifest.cluster.is_some() {
        required.push(OUTER_FILE);
    }
    // Listed only by checkpoints that have it; once listed, it is checked like the others.
    if manifest.files.contains_key(WORKERS_FILE) {
        required.push(WORKERS_FILE);
    }
    let mut contents = HashMap::new();
    for file in required {
        let entry =
            (manifest.files.get(file)).ok_or_else(|| format!("manifest lists no {file}"))?;
        let bytes =
            std::fs::read(dir.join(file)).map_err(|e| format!("cannot read {file}: {e}"))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(format!(
                "{file} is truncated or extended: {} bytes, manifest says {}",
                bytes.len(),
                entry.bytes
            ));
        }
        let hash = blake3::hash(&bytes).to_hex().to_string();
        if hash != entry.blake3 {
            return Err(format!(
                "{file} is corrupt: BLAKE3 {hash} does not match the manifest's {}",
                entry.blake3
            ));
        }
        contents.insert(file, bytes);
    }
    Ok(contents)
}

/// DiLoCo's outer momentum from `outer.safetensors`: empty (DDP) or one value a parameter.
fn parse_velocity(bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let t = st.tensor("outer_velocity").map_err(|e| e.to_string())?;
    let v = st::f32_from_le_bytes(t.data());
    if t.dtype() != safetensors::tensor::Dtype::F32 || !(v.is_empty() || v.len() == n) {
        return Err(format!(
            "outer_velocity has {} values, the model has {n}",
            v.len()
        ));
    }
    Ok(v)
}

/// The newest checkpoint that verifies, with a warning for each newer one that did not.
pub struct Loaded {
    pub state: TrainState,
    pub manifest: Manifest,
    /// What a multi-worker checkpoint holds beyond a single worker's.
    pub cluster: Option<ClusterExtras>,
    pub dir: PathBuf,
    pub warnings: Vec<String>,
}

/// Loads the newest valid checkpoint of a run; damaged newer ones are skipped with a warning
/// naming them. Fails when none verifies.
pub fn load_latest(run_dir: &Path, device: &Device) -> Result<Loaded, TrainError> {
    let found = list(run_dir);
    if found.is_empty() {
        return Err(TrainError::Checkpoint(format!(
            "{} has no checkpoints (expected {}/step-*)",
            run_dir.display(),
            checkpoints_dir(run_dir).display()
        )));
    }
    let mut warnings = Vec::new();
    for (_, dir) in found {
        match load_dir_with_extras(&dir, device) {
            Ok((state, manifest, cluster)) => {
                return Ok(Loaded {
                    state,
                    manifest,
                    cluster,
                    dir,
                    warnings,
                });
            }
            Err(e) => warnings.push(format!("{e}; trying the previous checkpoint")),
        }
    }
    Err(TrainError::Checkpoint(format!(
        "no valid checkpoint in {}: {}",
        run_dir.display(),
        warnings
            .iter()
            .map(|w| w.trim_end_matches("; trying the previous checkpoint"))
            .collect::<Vec<_>>()
            .join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(name: &str, n: usize, local: bool) -> OwnState {
        OwnState {
            name: name.into(),
            exp_avg: vec![0.5; n],
            exp_avg_sq: vec![0.25; n],
            adam_t: 40,
            local: local.then(|| vec![1.0; n]),
            residuals: vec![vec![], vec![-2.0; n / 2]],
        }
    }

    #[test]
    fn workers_own_states_round_trip() {
        let workers = vec![own("worker-0", 6, false), own("worker-1", 6, true)];
        let bytes = workers_bytes(&workers).unwrap();
        assert_eq!(parse_workers(&bytes, 6).unwrap(), workers);
    }

    #[test]
    fn a_malformed_workers_file_is_refused_with_the_reason() {
        let cases = [
            (
                vec![own("a", 6, false), own("a", 6, false)],
                6,
                "repeated name",
            ),
            (vec![own("", 6, false)], 6, "empty or repeated name"),
            (vec![own("a", 6, false)], 5, "the model has 5 parameters"),
        ];
        for (workers, n, why) in cases {
            let err = parse_workers(&workers_bytes(&workers).unwrap(), n).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
        let mut lying = own("a", 6, false);
        lying.residuals = vec![vec![]; MAX_FRAGMENTS + 1];
        let err = parse_workers(&workers_bytes(&[lying]).unwrap(), 6).unwrap_err();
        assert!(err.contains("declares 4097 residuals"), "{err}");
        let not_ours = outer_bytes(&[1.0]).unwrap();
        assert!(parse_workers(&not_ours, 1).unwrap_err().contains("not a"));
    }
}
