//! `holdfast report RUN`: one self-contained HTML page about a run (inline SVG and CSS, no
//! script, nothing fetched), from the files the run wrote.
//!
//! - Single worker (`metrics.jsonl`): loss (train and validation) and tokens/s against tokens,
//!   a timeline of the guards' actions, a summary table.
//! - Workers (`ledger.jsonl`, `events.jsonl`, `summary.json`): the same charts from the
//!   committed rounds, sync stalls and bytes sent per token per round, a timeline with a lane
//!   per worker (when it was in the run) on which every event of `events.jsonl` but the
//!   replicas' routine state reports is a mark at its time, the guards' actions per round, the
//!   events as a table, and `summary.json`.

mod svg;

use std::fmt::Write;
use std::path::Path;

use serde_json::Value;

use crate::run::{CONFIG_FILE, EVENTS_FILE, LEDGER_FILE, METRICS_FILE, SUMMARY_FILE};
use crate::{TrainError, atomic_write};
use svg::{Mark, Series, Timeline, escape, line_chart, timeline};

pub const REPORT_FILE: &str = "report.html";

/// Points a chart draws at most; longer series are thinned evenly (the last point kept).
const MAX_POINTS: usize = 2000;

/// Writes the report of `run_dir` to `out` (atomically).
pub fn write_report(run_dir: &Path, out: &Path) -> Result<(), TrainError> {
    atomic_write(out, render(run_dir)?.as_bytes())
}

/// The report of `run_dir` as one HTML page.
pub fn render(run_dir: &Path) -> Result<String, TrainError> {
    let config_path = run_dir.join(CONFIG_FILE);
    let config = std::fs::read_to_string(&config_path).map_err(|e| {
        TrainError::Config(format!(
            "{} is not a run directory ({}: {e})",
            run_dir.display(),
            config_path.display()
        ))
    })?;
    let page = if run_dir.join(LEDGER_FILE).exists() {
        cluster_page(run_dir)?
    } else {
        single_page(run_dir)?
    };
    let name = run_dir
        .file_name()
        .map_or("run".into(), |n| n.to_string_lossy().into_owned());
    Ok(html(&name, &page, &config))
}

/// What a page shows: titled sections of markup, then the summary's rows.
struct Page {
    kind: &'static str,
    sections: Vec<(String, String)>,
    summary: Vec<(String, String)>,
}

fn html(name: &str, page: &Page, config: &str) -> String {
    let mut out = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>holdfast report: {name}</title><style>\
         body{{font-family:sans-serif;margin:24px;color:#222;max-width:980px}}\
         table{{border-collapse:collapse;font-size:13px}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}}\
         pre{{background:#f6f6f6;padding:8px;font-size:12px}}\
         section{{margin-bottom:28px}}</style></head><body>\
         <h1>holdfast report: {name}</h1><p>{kind}, from the run directory's own files.</p>",
        name = escape(name),
        kind = page.kind
    );
    for (title, body) in &page.sections {
        let _ = write!(out, "<section><h2>{}</h2>{body}</section>", escape(title));
    }
    out.push_str("<section><h2>Summary</h2><table>");
    for (k, v) in &page.summary {
        let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    let _ = writeln!(
        out,
        "</table></section><section><h2>Config</h2><pre>{}</pre></section></body></html>",
        escape(config)
    );
    out
}

/// The lines of a JSON-lines file (none when it does not exist), each checked to be JSON.
fn read_jsonl(path: &Path) -> Result<Vec<Value>, TrainError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::Config(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// A number field of a JSON line.
fn field(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// `points` thinned to at most [`MAX_POINTS`], evenly, keeping the last.
fn thin(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points;
    }
    let every = points.len().div_ceil(MAX_POINTS);
    let last = *points.last().expect("not empty");
    let mut kept: Vec<_> = points.into_iter().step_by(every).collect();
    if kept.last() != Some(&last) {
        kept.push(last);
    }
    kept
}

fn series(name: &str, color: &'static str, points: Vec<(f64, f64)>, dots: bool) -> Series {
    Series {
        name: name.into(),
        color,
        points: thin(points),
        dots,
    }
}

/// Times that restart from 0 (a new coordinator's stretch, a resumed run) continue from where
/// the previous stretch ended.
#[derive(Default)]
struct Clock {
    offset: f64,
    last_raw: f64,
    last: f64,
}

impl Clock {
    fn at(&mut self, raw: f64) -> f64 {
        if raw < self.last_raw {
            self.offset = self.last;
        }
        self.last_raw = raw;
        self.last = raw + self.offset;
        self.last
    }
}

/// The lines of `metrics.jsonl` of one kind.
fn of_kind<'a>(lines: &'a [Value], kind: &'static str) -> impl Iterator<Item = &'a Value> {
    lines
        .iter()
        .filter(move |l| l.get("event").and_then(Value::as_str) == Some(kind))
}

/// A step line of `metrics.jsonl`, placed in tokens and in time.
struct StepRow {
    step: f64,
    tokens: f64,
    loss: f64,
    tokens_per_s: f64,
    t: f64,
}

/// The step lines, and the tokens a step trains (every step the same; the first line says how
/// many: its tokens/s times its seconds).
fn step_rows(lines: &[Value]) -> (Vec<StepRow>, f64) {
    let tokens_per_step = of_kind(lines, "step")
        .next()
        .and_then(|l| Some(field(l, "tokens_per_s")? * field(l, "elapsed_s")? / field(l, "step")?))
        .map_or(1.0, |t| t.round().max(1.0));
    let mut clock = Clock::default();
    let rows = of_kind(lines, "step")
        .filter_map(|l| {
            let step = field(l, "step")?;
            Some(StepRow {
                step,
                tokens: step * tokens_per_step,
                loss: field(l, "loss")?,
                tokens_per_s: field(l, "tokens_per_s")?,
                t: clock.at(field(l, "elapsed_s")?),
            })
        })
        .collect();
    (rows, tokens_per_step)
}

/// The guards' actions, at the time of the step they acted on.
fn single_guard_marks(lines: &[Value], steps: &[StepRow]) -> Vec<Mark> {
    let time_of = |step: f64| {
        steps
            .iter()
            .take_while(|s| s.step <= step)
            .last()
            .map_or(0.0, |s| s.t)
    };
    of_kind(lines, "guard")
        .map(|l| {
            let step = field(l, "step").unwrap_or(0.0);
            let action = l.get("action").and_then(Value::as_str).unwrap_or("guard");
            let reason = l.get("reason").and_then(Value::as_str).unwrap_or("");
            let to = field(l, "to_step").map_or(String::new(), |s| format!(", back to step {s}"));
            Mark {
                t: time_of(step),
                lane: 0,
                kind: action.to_string(),
                text: format!("step {step}: {reason}{to}"),
            }
        })
        .collect()
}

fn single_page(run_dir: &Path) -> Result<Page, TrainError> {
    let lines = read_jsonl(&run_dir.join(METRICS_FILE))?;
    let (steps, tokens_per_step) = step_rows(&lines);
    let val: Vec<(f64, f64)> = of_kind(&lines, "eval")
        .filter_map(|l| Some((field(l, "step")? * tokens_per_step, field(l, "val_loss")?)))
        .collect();
    let train = steps.iter().map(|s| (s.tokens, s.loss)).collect();
    let loss = line_chart(
        "Loss",
        "tokens",
        "loss",
        &[
            series("train", "#1f77b4", train, false),
            series("validation", "#d62728", val.clone(), true),
        ],
    );
    let rate = steps.iter().map(|s| (s.tokens, s.tokens_per_s)).collect();
    let speed = line_chart(
        "Throughput",
        "tokens",
        "tokens/s (since the start)",
        &[series("tokens/s", "#2ca02c", rate, false)],
    );
    let end_s = steps.last().map_or(0.0, |s| s.t);
    let lanes = Timeline {
        lanes: vec!["worker".into()],
        spans: vec![vec![(0.0, end_s)]],
        marks: single_guard_marks(&lines, &steps),
        end_s,
    };
    let last = steps.last();
    let show = |f: &dyn Fn(&StepRow) -> String| last.map_or("-".into(), f);
    let summary = vec![
        ("steps".into(), show(&|s| s.step.to_string())),
        ("tokens".into(), show(&|s| s.tokens.to_string())),
        (
            "final train loss".into(),
            show(&|s| format!("{:.4}", s.loss)),
        ),
        (
            "last validation loss".into(),
            val.last().map_or("-".into(), |v| format!("{:.4}", v.1)),
        ),
        (
            "tokens/s".into(),
            show(&|s| format!("{:.0}", s.tokens_per_s)),
        ),
        ("guard actions".into(), lanes.marks.len().to_string()),
        ("seconds".into(), format!("{end_s:.1}")),
    ];
    let guards = timeline("Guard actions over time", &lanes);
    Ok(Page {
        kind: "Single-worker run",
        sections: vec![
            ("Loss".into(), loss),
            ("Throughput".into(), speed),
            ("Guard actions".into(), guards),
        ],
        summary,
    })
}

/// A committed round of the ledger, with the tokens committed up to it.
struct Round {
    round: f64,
    tokens_so_far: f64,
    record: Value,
    t: Option<f64>,
}

fn committed_rounds(ledger: &[Value]) -> Vec<Round> {
    let mut clock = Clock::default();
    let mut rounds: Vec<Round> = Vec::new();
    for line in ledger {
        if let Some(from) = line
            .get("voided_rounds")
            .and_then(|v| v.get(0))
            .and_then(Value::as_f64)
        {
            // Undone: those rounds' work is not in the weights (the coordinator does the same).
            rounds.retain(|r| r.round < from);
            continue;
        }
        let (Some(round), Some(tokens)) = (field(line, "round"), field(line, "tokens")) else {
            continue;
        };
        let before = rounds.last().map_or(0.0, |r| r.tokens_so_far);
        rounds.push(Round {
            round,
            tokens_so_far: before + tokens,
            record: line.clone(),
            t: field(line, "elapsed_s").map(|t| clock.at(t)),
        });
    }
    rounds
}

/// A field of every committed round, against its round number or the tokens committed so far.
fn by_round(rounds: &[Round], f: impl Fn(&Value) -> Option<f64>) -> Vec<(f64, f64)> {
    rounds
        .iter()
        .filter_map(|r| Some((r.round, f(&r.record)?)))
        .collect()
}

fn by_tokens(rounds: &[Round], f: impl Fn(&Value) -> Option<f64>) -> Vec<(f64, f64)> {
    (rounds.iter())
        .filter_map(|r| Some((r.tokens_so_far, f(&r.record)?)))
        .collect()
}

/// Loss (each round's mean, and the final validation loss) and throughput, against tokens.
fn progress_charts(rounds: &[Round], summary: Option<&Value>) -> (String, String) {
    let final_val: Vec<(f64, f64)> = summary
        .and_then(|s| s.pointer("/eval/val_loss")?.as_f64())
        .zip(rounds.last())
        .map(|(v, r)| (r.tokens_so_far, v))
        .into_iter()
        .collect();
    let train = by_tokens(rounds, |r| field(r, "loss"));
    let loss = line_chart(
        "Loss",
        "tokens committed",
        "loss",
        &[
            series("train (round mean)", "#1f77b4", train, false),
            series("validation (final)", "#d62728", final_val, true),
        ],
    );
    let rate = by_tokens(rounds, |r| {
        Some(field(r, "tokens")? / field(r, "wall_s")?.max(1e-9))
    });
    let speed = line_chart(
        "Throughput",
        "tokens committed",
        "tokens/s",
        &[series("round tokens / wall s", "#2ca02c", rate, false)],
    );
    (loss, speed)
}

/// Sync stall and peer wait per round, then bytes sent per token per round.
fn sync_charts(rounds: &[Round]) -> String {
    let stalls = line_chart(
        "Sync stalls",
        "round",
        "seconds",
        &[
            series(
                "sync stall",
                "#ff7f0e",
                by_round(rounds, |r| field(r, "sync_s")),
                false,
            ),
            series(
                "peer wait (mean)",
                "#9467bd",
                by_round(rounds, |r| field(r, "wait_s")),
                false,
            ),
        ],
    );
    let per_token = by_round(rounds, |r| {
        Some(field(r, "bytes_sent")? / field(r, "tokens")?.max(1.0))
    });
    let bytes = line_chart(
        "Bytes sent per token",
        "round",
        "bytes / token",
        &[series("all workers", "#8c564b", per_token, false)],
    );
    stalls + &bytes
}

fn cluster_page(run_dir: &Path) -> Result<Page, TrainError> {
    let rounds = committed_rounds(&read_jsonl(&run_dir.join(LEDGER_FILE))?);
    let events = read_jsonl(&run_dir.join(EVENTS_FILE))?;
    let summary = read_summary(&run_dir.join(SUMMARY_FILE))?;
    let (loss, speed) = progress_charts(&rounds, summary.as_ref());
    let (lanes, table) = cluster_timeline(&events, &rounds, summary.as_ref());
    Ok(Page {
        kind: "Multi-worker run",
        sections: vec![
            ("Loss".into(), loss),
            ("Throughput".into(), speed),
            (
                "Workers, faults and guard actions".into(),
                timeline("Timeline", &lanes),
            ),
            ("Sync".into(), sync_charts(&rounds)),
            ("Events".into(), table),
        ],
        summary: summary_rows(summary.as_ref()),
    })
}

fn read_summary(path: &Path) -> Result<Option<Value>, TrainError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::io(path, e)),
    }
}

fn summary_rows(summary: Option<&Value>) -> Vec<(String, String)> {
    let Some(Value::Object(map)) = summary else {
        return vec![(
            "summary.json".into(),
            "absent: the run has not finished".into(),
        )];
    };
    map.iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) if n.is_f64() => {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    if f.abs() >= 1.0 {
                        format!("{f:.2}")
                    } else {
                        format!("{f:.4}")
                    }
                }
                Value::Number(n) => n.to_string(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

/// Which worker an event is about, when it names one.
fn worker_of(detail: &Value) -> Option<&str> {
    ["name", "of"]
        .iter()
        .find_map(|k| detail.get(*k).and_then(Value::as_str))
}

/// An event's fields but its kind, as compact JSON, cut to about 400 bytes.
fn event_text(detail: &Value) -> String {
    let mut text = match detail {
        Value::Object(m) => {
            let mut rest = m.clone();
            rest.remove("event");
            Value::Object(rest).to_string()
        }
        other => other.to_string(),
    };
    if text.len() > 400 {
        let cut = (0..=400)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// The rounds in which guards skipped steps or rolled back, on the run's lane at their commit.
fn guard_marks(rounds: &[Round]) -> Vec<Mark> {
    let mut marks = Vec::new();
    for r in rounds {
        let Some(at) = r.t else { continue };
        for (key, kind) in [
            ("guard_skips", "guard_skip"),
            ("guard_rollbacks", "guard_rollback"),
        ] {
            let n = field(&r.record, key).unwrap_or(0.0);
            if n > 0.0 {
                marks.push(Mark {
                    t: at,
                    lane: 0,
                    kind: kind.into(),
                    text: format!("round {}: {n} ({key})", r.round),
                });
            }
        }
    }
    marks
}

/// The lane of worker `name` (added when new), or the run's own lane.
fn lane_of(t: &mut Timeline, open: &mut Vec<Option<f64>>, name: Option<&str>) -> usize {
    let Some(name) = name else { return 0 };
    t.lanes.iter().position(|l| l == name).unwrap_or_else(|| {
        t.lanes.push(name.to_string());
        t.spans.push(Vec::new());
        open.push(None);
        t.lanes.len() - 1
    })
}

/// The timeline of a multi-worker run, and its events as a table.
fn cluster_timeline(
    events: &[Value],
    rounds: &[Round],
    summary: Option<&Value>,
) -> (Timeline, String) {
    let mut t = Timeline {
        lanes: vec!["run".into()],
        spans: vec![Vec::new()],
        marks: Vec::new(),
        end_s: 0.0,
    };
    let mut open: Vec<Option<f64>> = vec![None];
    let mut clock = Clock::default();
    let mut table =
        String::from("<table><tr><th>s</th><th>event</th><th>worker</th><th>detail</th></tr>");
    let mut routine = 0;
    for e in events {
        let at = clock.at(field(e, "elapsed_s").unwrap_or(0.0));
        let detail = e.get("detail").cloned().unwrap_or(Value::Null);
        let kind = detail
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or("coordinator_start")
            .to_string();
        if kind == "state_reported" {
            routine += 1;
            continue;
        }
        let who = worker_of(&detail);
        let l = lane_of(&mut t, &mut open, who);
        match kind.as_str() {
            "joined" => open[l] = Some(open[l].unwrap_or(at)),
            "removed" => {
                if let Some(from) = open[l].take() {
                    t.spans[l].push((from, at));
                }
            }
            _ => {}
        }
        let text = event_text(&detail);
        let _ = write!(
            table,
            "<tr><td>{at:.1}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&kind),
            escape(who.unwrap_or("")),
            escape(&text)
        );
        t.marks.push(Mark {
            t: at,
            lane: l,
            kind,
            text,
        });
        t.end_s = t.end_s.max(at);
    }
    t.marks.extend(guard_marks(rounds));
    for at in rounds.iter().filter_map(|r| r.t) {
        t.end_s = t.end_s.max(at);
    }
    if let Some(wall) = summary.and_then(|s| field(s, "wall_s")) {
        t.end_s = t.end_s.max(wall);
    }
    for (l, from) in open.iter().enumerate() {
        if let Some(from) = from {
            t.spans[l].push((*from, t.end_s));
        }
    }
    let _ = write!(
        table,
        "</table><p>{routine} routine state reports (one per replica and round) are not listed.</p>"
    );
    (t, table)
}

#[cfg(test)]
mod tests;
