//! `emu-bench vs-qemu --postcopy`: issue 11's targets in one run, QEMU 10.0 and emu alternating:
//! the capped writer (QEMU postcopy against emu's postcopy, its dirty-rate limiting, its postcopy
//! stall policy and its default precopy), then uncapped writers against "the time to send the RAM
//! once" (emu migrating the same guest paused). Writes docs/postcopy.md. With `--emu-only`: the
//! uncapped scenarios with emu's rows only (postcopy with and without `postcopy-preempt`, and the
//! paused reference), for the fault latencies; writes docs/postcopy-preempt.md.

use std::path::Path;

use serde_json::{json, Value};

use super::{
    alternate, begin, emit, host_load, loads_text, machine, mb, measure_loopback, median, num, rates_cell, Vmm,
    CAPPED_BANDWIDTH, CAPPED_DIRTY_RATE, CAPPED_SCENARIO, DOWNTIME_LIMIT_MS, MEM, MIGRATION_TIMEOUT,
    POSTCOPY_AFTER_BYTES, POSTCOPY_CAPPED_VMMS, POSTCOPY_UNCAPPED_SCENARIOS, POSTCOPY_UNCAPPED_VMMS,
};

/// emu's downtime target (ms) and its postcopy total against the paused reference.
const DOWNTIME_TARGET_MS: f64 = 2.0;
const ONCE_RATIO_TARGET: f64 = 1.2;

pub(super) fn run(rounds: usize) {
    let (version, revision, started) = begin("vs-qemu-postcopy", rounds);
    let mut loads = vec![host_load("start")];
    let loopback = measure_loopback("before");
    let capped = alternate(&CAPPED_SCENARIO, POSTCOPY_CAPPED_VMMS, rounds, loopback, CAPPED_BANDWIDTH);
    let mut uncapped = Vec::new();
    for s in POSTCOPY_UNCAPPED_SCENARIOS {
        loads.push(host_load(&format!("before uncapped {}", s.name)));
        uncapped.push(alternate(s, POSTCOPY_UNCAPPED_VMMS, rounds, loopback, 0));
    }
    loads.push(host_load("end"));
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    emit(json!({"bench": "vs-qemu-postcopy", "done": true, "minutes": minutes}));

    let mut md = format!(
        "# Postcopy: emu against QEMU, and against emu's other strategies\n\nMade by `scripts/bench-vs-qemu.sh \
         --postcopy` (`emu-bench vs-qemu --postcopy`) in {minutes:.1} minutes: {}. {version}; emu {revision}. \
         {rounds} round(s), the VMMs alternating (the order reversed in every second round). Single-stream TCP \
         loopback before the run: {:.0} MB/s.\n\n{}\n\n",
        machine(),
        loopback.hot / 1e6,
        {
            let t = loads_text(&loads);
            if t.ends_with('.') {
                t
            } else {
                t + "."
            }
        },
    );
    md += &format!(
        "Setup, as in `--capped`: the guest `target/guest-images/emu-guest32.elf`, {MEM}, one vCPU, migrated over TCP \
         on 127.0.0.1 through QMP with a {DOWNTIME_LIMIT_MS} ms downtime limit. `qemu-postcopy`: QEMU with the \
         `postcopy-ram` capability on both sides and `postcopy-blocktime` on the destination (set before \
         `migrate-incoming` / `migrate`). **The switch rule, the same for both VMMs**: the benchmark polls the \
         source's `query-migrate` every 10 ms from `migrate` on, and sends `migrate-start-postcopy` at the first poll \
         that shows status `active` with `ram.transferred` at least {} MiB (so in pass 0: the guest's RAM is not yet \
         sent once). `emu-postcopy`: emu's defaults but `postcopy-preempt` off (requests on the one connection), the same rule; \
         `emu-postcopy-preempt` (uncapped only): with it on (the urgent connection). `emu-postcopy-policy`: emu with `stall-policy` \
         postcopy and no command (it switches once precopy stops paying). `emu-uffd-wp-dirty-rate-limit`: precopy \
         with the uffd-wp tracker and `dirty-rate-limit` {CAPPED_DIRTY_RATE} pages/s from the start (the capped \
         mode's row). `emu-throttle`: emu's default precopy (auto-converge by throttling once passes stop paying). \
         `emu-paused-send-once`: `stop` on the source, then an uncapped emu migration: every page goes once, the \
         reference \"the time to send its RAM once\". A migration still running after {} s is cancelled.\n\n",
        POSTCOPY_AFTER_BYTES >> 20,
        MIGRATION_TIMEOUT.as_secs(),
    );
    md += "Columns: *total* and *downtime* as each VMM reports them in the source's `query-migrate` (QEMU: whole \
           ms; emu: `downtime-us`, source pause to destination running); *MB sent* `ram.transferred`; *requests* \
           the source's `ram.postcopy-requests` (both VMMs have it); *guest rate* pages written per second by the \
           guest (its own once-a-second reports, median: before on the source; during on the source and, in \
           postcopy, on the destination until the source said completed; after on the destination); *fault latency* \
           emu's destination `postcopy.fault-latency-us` p50 / p99 / max (us) from its `query-migrate` once it says \
           `completed`, just after the source; *blocktime* QEMU 10.0's destination `postcopy-blocktime` (ms, total \
           time vCPUs waited for pages; 10.0 has no latency percentiles, its `postcopy-latency` came in 10.1), with \
           `postcopy-vcpu-blocktime` per vCPU; *switchover to complete*: emu's \
           `postcopy.switchover-to-complete-ms`; QEMU reports none, so its figure (marked ~) is the time between \
           the first poll that saw `postcopy-active` and the one that saw `completed` (10 ms polls); *switched*: when \
           the benchmark sent `migrate-start-postcopy` (ms after `migrate`, MB sent then).\n\n";

    // The summary goes here once the targets are counted.
    let summary_at = md.len();
    // Rounds that met each target, and rounds measured: total against QEMU, downtime, send-once ratio.
    let mut tally = [(0, 0); 3];
    md += &format!("## 1. 1 GiB `wl={}` over a {} MiB/s link\n\n", CAPPED_SCENARIO.name, CAPPED_BANDWIDTH >> 20);
    md += &table(&capped, None);
    let qemu_keys: Vec<String> = capped
        .iter()
        .chain(uncapped.iter().flatten())
        .filter(|r| r["vmm"] == Vmm::QemuPostcopy.name())
        .filter_map(|r| r["postcopy"]["destination-keys"].as_array())
        .map(|k| k.iter().filter_map(|k| k.as_str()).collect::<Vec<_>>().join(", "))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    md += &format!(
        "\nQEMU 10.0's destination `query-migrate` just after completion held: {}.\n",
        if qemu_keys.is_empty() { "nothing (no completed QEMU postcopy)".into() } else { qemu_keys.join("; ") }
    );
    md += "\nTargets (issue 11), per round: emu's postcopy total no longer than QEMU's postcopy total in the same \
           round; emu's postcopy downtime at most 2 ms.\n\n";
    for round in 1..=rounds {
        let q = find(&capped, Vmm::QemuPostcopy, round);
        let e = find(&capped, Vmm::EmuPostcopy, round);
        let (qt, et, ed) = (total(q), total(e), e.and_then(|r| r["downtime-ms"].as_f64()));
        md += &format!("- round {round}: total: ");
        md += &match (et, qt) {
            (Some(et), Some(qt)) => format!(
                "emu {et:.0} ms, QEMU {qt:.0} ms: **{}** (emu/QEMU {:.2}); ",
                verdict(et <= qt, &mut tally[0]),
                et / qt
            ),
            _ => "**not measured** (a postcopy row did not complete); ".into(),
        };
        md += &match ed {
            Some(d) => {
                format!("downtime: emu {d:.2} ms: **{}**.\n", verdict(d <= DOWNTIME_TARGET_MS, &mut tally[1]))
            }
            None => "downtime: **not measured**.\n".into(),
        };
    }
    md += &errors(&capped);

    md += "\n## 2. Uncapped, against the time to send the RAM once\n\n";
    md += &format!(
        "Target (issue 11): emu's postcopy total at most {ONCE_RATIO_TARGET}x the total of `emu-paused-send-once` in \
         the same round (last column: each row's total over it).\n\n"
    );
    let mut verdicts = String::new();
    for (s, runs) in POSTCOPY_UNCAPPED_SCENARIOS.iter().zip(&uncapped) {
        md += &format!("### 1 GiB `wl={}`\n\n", s.name);
        let ratios: Vec<(usize, Option<f64>)> = (1..=rounds)
            .map(|round| {
                let once = total(find(runs, Vmm::EmuPausedOnce, round));
                (round, total(find(runs, Vmm::EmuPostcopy, round)).zip(once).map(|(t, o)| t / o))
            })
            .collect();
        md += &table(runs, Some(Vmm::EmuPausedOnce));
        md += &errors(runs);
        md += "\n";
        for (round, ratio) in ratios {
            verdicts += &match ratio {
                Some(x) => format!(
                    "- `{}` round {round}: emu postcopy / send-once = {x:.2}: **{}**.\n",
                    s.name,
                    verdict(x <= ONCE_RATIO_TARGET, &mut tally[2])
                ),
                None => format!("- `{}` round {round}: **not measured** (a row did not complete).\n", s.name),
            };
        }
    }
    md += &verdicts;

    md += &strategies(&capped);
    let all: Vec<&Value> = capped.iter().chain(uncapped.iter().flatten()).collect();
    md += &where_time_goes(&all);
    let [t, d, o] = tally;
    let summary = format!(
        "## Summary\n\nIssue 11's targets, rounds met of rounds measured: emu's postcopy total no longer than QEMU's \
         over the capped link: **{} of {}**; emu's postcopy downtime at most {DOWNTIME_TARGET_MS} ms there: **{} of \
         {}**; emu's uncapped postcopy total at most {ONCE_RATIO_TARGET}x the time to send its RAM once: **{} of {}** \
         (both workloads). Figures and reasons below (section 4: where emu's time goes).\n\n",
        t.0, t.1, d.0, d.1, o.0, o.1
    );
    md.insert_str(summary_at, &summary);
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    if let Err(e) = std::fs::write(docs.join("postcopy.md"), md) {
        eprintln!("cannot write docs/postcopy.md: {e}");
    }
}

/// `--postcopy --emu-only`: the uncapped scenarios, emu's rows only (no QEMU needed), alternating;
/// the fault latencies with and without the urgent connection side by side. Writes
/// docs/postcopy-preempt.md.
pub(super) fn run_emu_only(rounds: usize) {
    let (_, revision, started) = begin("vs-qemu-postcopy-emu-only", rounds);
    let mut loads = vec![host_load("start")];
    let loopback = measure_loopback("before");
    let vmms: Vec<Vmm> = POSTCOPY_UNCAPPED_VMMS.iter().copied().filter(|v| !v.is_qemu()).collect();
    let mut uncapped = Vec::new();
    for s in POSTCOPY_UNCAPPED_SCENARIOS {
        loads.push(host_load(&format!("before {}", s.name)));
        uncapped.push(alternate(s, &vmms, rounds, loopback, 0));
    }
    loads.push(host_load("end"));
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    emit(json!({"bench": "vs-qemu-postcopy-emu-only", "done": true, "minutes": minutes}));
    let mut md = format!(
        "# Postcopy with and without the urgent connection (postcopy-preempt)\n\nMade by \
         `scripts/bench-vs-qemu.sh --postcopy --emu-only` (`emu-bench vs-qemu --postcopy --emu-only`) in \
         {minutes:.1} minutes: {}. emu {revision}. {rounds} round(s), the rows alternating (the order reversed in \
         every second round). Single-stream TCP loopback before the run: {:.0} MB/s. {}\n\nThe uncapped scenarios \
         of docs/postcopy.md (section 2), emu's rows only: `emu-postcopy` with `postcopy-preempt` off (requests \
         and their pages on the one connection, behind the background push), `emu-postcopy-preempt` with it on \
         (the urgent connection), `emu-paused-send-once` the reference. The same switch rule: \
         `migrate-start-postcopy` at the first 10 ms poll with {} MiB sent. Columns as in docs/postcopy.md; the \
         fault latency is the destination's `postcopy.fault-latency-us` (from the fault read to the page in \
         place).\n\n",
        machine(),
        loopback.hot / 1e6,
        loads_text(&loads),
        POSTCOPY_AFTER_BYTES >> 20,
    );
    for (s, runs) in POSTCOPY_UNCAPPED_SCENARIOS.iter().zip(&uncapped) {
        md += &format!("## 1 GiB `wl={}`\n\n", s.name);
        md += &table(runs, Some(Vmm::EmuPausedOnce));
        md += &errors(runs);
        md += "\n";
    }
    md += "## Fault latency, without / with the urgent connection\n\nMedians over the rounds (us), and the \
           requests the destination made.\n\n| scenario | row | p50 | p99 | max | requests | total ms | downtime ms \
           |\n|---|---|---|---|---|---|---|---|\n";
    for (s, runs) in POSTCOPY_UNCAPPED_SCENARIOS.iter().zip(&uncapped) {
        for vmm in [Vmm::EmuPostcopy, Vmm::EmuPostcopyPreempt] {
            let rows: Vec<&Value> = runs.iter().filter(|r| r["vmm"] == vmm.name() && r["completed"] == true).collect();
            let med = |f: &dyn Fn(&Value) -> Option<f64>| {
                let v: Vec<f64> = rows.iter().filter_map(|r| f(r)).collect();
                if v.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.0}", median(v))
                }
            };
            let lat = |k: &'static str| move |r: &Value| r["postcopy"]["destination"]["fault-latency-us"][k].as_f64();
            md += &format!(
                "| `{}` | `{}` | {} | {} | {} | {} | {} | {} |\n",
                s.name,
                vmm.name(),
                med(&lat("p50")),
                med(&lat("p99")),
                med(&lat("max")),
                med(&|r| r["postcopy"]["destination"]["requests"].as_f64()),
                med(&|r| r["total-ms"].as_f64()),
                med(&|r| r["downtime-ms"].as_f64()),
            );
        }
    }
    let all: Vec<&Value> = uncapped.iter().flatten().collect();
    md += &where_time_goes(&all);
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    if let Err(e) = std::fs::write(docs.join("postcopy-preempt.md"), md) {
        eprintln!("cannot write docs/postcopy-preempt.md: {e}");
    }
}

fn find(runs: &[Value], vmm: Vmm, round: usize) -> Option<&Value> {
    runs.iter().find(|r| r["vmm"] == vmm.name() && r["round"] == round)
}

/// The total of a completed run.
fn total(r: Option<&Value>) -> Option<f64> {
    r.filter(|r| r["completed"] == true).and_then(|r| r["total-ms"].as_f64())
}

/// One row per run; with `reference`, a last column: total over the reference's in the same round.
fn table(runs: &[Value], reference: Option<Vmm>) -> String {
    let mut md = String::from(
        "| VMM | round | status | total ms | downtime ms | MB sent | requests | guest rate before / during / after \
         (pages/s) | fault latency p50 / p99 / max (us) | blocktime ms (per vCPU) | switchover to complete ms | \
         switched |",
    );
    md += if reference.is_some() { " ratio to send-once |\n" } else { "\n" };
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|";
    md += if reference.is_some() { "---|\n" } else { "\n" };
    for r in runs {
        let pc = &r["postcopy"];
        let lat = &pc["destination"]["fault-latency-us"];
        let latency =
            if lat.is_object() { format!("{} / {} / {}", lat["p50"], lat["p99"], lat["max"]) } else { "-".into() };
        let blocktime = match (pc["blocktime-ms"].as_u64(), pc["vcpu-blocktime-ms"].as_array()) {
            (Some(b), Some(v)) => format!("{b} ({})", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")),
            (Some(b), None) => b.to_string(),
            _ => "-".into(),
        };
        let to_complete = match (pc["source"]["switchover-to-complete-ms"].as_f64(), pc["polled-postcopy-ms"].as_f64())
        {
            (Some(ms), _) => format!("{ms:.0}"),
            (None, Some(ms)) => format!("~{ms:.0}"),
            _ => "-".into(),
        };
        let switched = match (pc["switch-at-ms"].as_f64(), pc["switch-at-bytes"].as_f64()) {
            (Some(ms), Some(b)) => format!("{ms:.0} ms, {:.0} MB", b / 1e6),
            _ if r["emu"]["stop-reason"] == "postcopy" => "by policy".into(),
            _ if r["vmm"] == Vmm::EmuPostcopyPolicy.name() => "never (policy)".into(),
            _ => "-".into(),
        };
        let status = match r.get("error") {
            Some(e) => format!("error: {}", e.as_str().unwrap_or("?").chars().take(120).collect::<String>()),
            None => r["status"].as_str().unwrap_or("?").to_string(),
        };
        let status = match r["verify"]["failures"].as_u64() {
            Some(f) => format!("{status}, failures={f}, VERIFY-FAIL lines {}", r["verify"]["fail-lines"]),
            None => status,
        };
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["vmm"].as_str().unwrap_or("?"),
            r["round"],
            status,
            num(&r["total-ms"], 0),
            num(&r["downtime-ms"], 2),
            mb(&r["bytes"]),
            pc["requests"].as_u64().map(|n| n.to_string()).unwrap_or("-".into()),
            rates_cell(r),
            latency,
            blocktime,
            to_complete,
            switched,
        );
        if let Some(reference) = reference {
            let once = total(find(runs, reference, r["round"].as_u64().unwrap_or(0) as usize));
            md +=
                &format!(" {} |", total(Some(r)).zip(once).map(|(t, o)| format!("{:.2}", t / o)).unwrap_or("-".into()));
        }
        md += "\n";
    }
    md
}

/// Runs that failed, and what emu's postcopy said of itself where it looks off.
fn errors(runs: &[Value]) -> String {
    let mut out = String::new();
    for r in runs {
        let who = format!("{} round {}", r["vmm"].as_str().unwrap_or("?"), r["round"]);
        if let Some(e) = r.get("error") {
            out += &format!("- {who}: error: {e}\n");
        }
        if let Some(e) = r["error-desc"].as_str() {
            out += &format!("- {who}: error-desc: {e}\n");
        }
        let pc = &r["postcopy"];
        if r["completed"] == true && pc.is_object() {
            if pc["destination-status"] != "completed" {
                out += &format!(
                    "- {who}: the destination's status stayed {} after the source's completed\n",
                    pc["destination-status"]
                );
            }
            let (src, dst) = (&pc["source"], &pc["destination"]);
            let pages =
                |v: &Value| v["pages-pushed"].as_u64().unwrap_or(0) + v["pages-requested"].as_u64().unwrap_or(0);
            if src.is_object() && dst.is_object() && pages(dst) != pages(src) {
                out += &format!(
                    "- {who}: the destination's pages-pushed / pages-requested are {} / {}, the source's {} / {}\n",
                    dst["pages-pushed"], dst["pages-requested"], src["pages-pushed"], src["pages-requested"]
                );
            }
            for side in ["source", "destination"] {
                if let Some(n) = pc[side]["owed-left"].as_u64().filter(|&n| n > 0) {
                    out += &format!("- {who}: {side} says owed-left {n} once completed\n");
                }
            }
        }
    }
    if out.is_empty() {
        out
    } else {
        format!("\nNotes:\n\n{out}")
    }
}

/// Medians over rounds of the capped runs, one row a strategy.
fn strategies(capped: &[Value]) -> String {
    let mut md = format!(
        "\n## 3. Which strategy: 1 GiB `wl={}` over {} MiB/s\n\nMedians over the rounds of section 1 (the range in brackets), runs that completed. *Guest rate \
         during*: the guest's page-write rate while it migrates, as a share of its rate before (100% is no \
         slowdown); it lasts for *total*.\n\n| strategy | row | total s | downtime ms | guest rate during (of before) \
         | MB sent | what to know |\n|---|---|---|---|---|---|---|\n",
        CAPPED_SCENARIO.name,
        CAPPED_BANDWIDTH >> 20
    );
    let rows = [
        (
            "precopy",
            Vmm::EmuThrottle,
            "emu's default; a writer that outruns the link is throttled until it fits (auto-converge); the guest \
             lives on the source until the end",
        ),
        (
            "precopy + dirty-rate-limit",
            Vmm::EmuRateLimit,
            "uffd-wp tracker; every write to a page already sent waits in the fault path, the guest slowed to the \
             limit for the whole migration",
        ),
        (
            "postcopy",
            Vmm::EmuPostcopy,
            "the guest runs on the destination at once and each page is sent about once; until complete it needs \
             both hosts and the link (a broken link pauses it and `migrate-recover` resumes; a lost source loses it)",
        ),
        ("postcopy (QEMU 10.0, for reference)", Vmm::QemuPostcopy, "same rule, same link"),
    ];
    for (strategy, vmm, note) in rows {
        let runs: Vec<&Value> = capped.iter().filter(|r| r["vmm"] == vmm.name() && r["completed"] == true).collect();
        // The median, with the range where there are several rounds.
        let cell = |f: &dyn Fn(&Value) -> Option<f64>, show: &dyn Fn(f64) -> String| {
            let v: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
            let (lo, hi) = (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max));
            match v.len() {
                0 => "-".to_string(),
                1 => show(v[0]),
                _ => format!("{} ({}-{})", show(median(v)), show(lo), show(hi)),
            }
        };
        let t = cell(&|r| r["total-ms"].as_f64(), &|t| format!("{:.1}", t / 1e3));
        let d = cell(&|r| r["downtime-ms"].as_f64(), &|d| format!("{d:.1}"));
        let share = cell(&|r| Some(r["guest-rate-during"].as_f64()? / r["guest-rate-before"].as_f64()?), &|s| {
            format!("{:.prec$}%", s * 100.0, prec = if s < 0.01 { 3 } else { 1 })
        });
        let b = cell(&|r| r["bytes"].as_f64(), &|b| format!("{:.0}", b / 1e6));
        md += &format!("| {strategy} | `{}` | {t} | {d} | {share} | {b} | {note} |\n", vmm.name());
    }
    md
}

/// emu's postcopy rows: where the downtime went, how fast the owed pages went after the switchover
/// (against the paused reference's pass 0), and each side's account of the pages.
fn where_time_goes(runs: &[&Value]) -> String {
    let mut md = String::from(
        "\n## 4. emu's postcopy: where the time goes\n\nPer emu run that ended in postcopy, and the paused \
         reference: `downtime-breakdown-us` of the source; pages owed at the switchover; the owed pages per second \
         between switchover and completion (the reference: its pass 0's pages per second, `passes[0]`); requests and \
         pages as the source and as the destination count them in `postcopy` (`pages-pushed` / `pages-requested`). \
         A *switched* late against the rule (first poll at 64 MiB or more) means `query-migrate` answered late.\n\n\
         | scenario | VMM | round | downtime ms | downtime breakdown (us) | owed at switchover | pages/s after \
         switchover (reference: pass 0) | source: requests, pushed / requested | destination: requests, pushed / \
         requested |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs
        .iter()
        .filter(|r| r["emu"].is_object() && (r["postcopy"].is_object() || r["vmm"] == Vmm::EmuPausedOnce.name()))
    {
        let e = &r["emu"];
        let (src, dst) = (&r["postcopy"]["source"], &r["postcopy"]["destination"]);
        let breakdown = e["downtime-breakdown-us"]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let per_s = match (src["owed-at-switchover"].as_f64(), src["switchover-to-complete-ms"].as_f64()) {
            (Some(n), Some(ms)) if ms > 0.0 => format!("{:.0}k", n / ms),
            _ => match (e["pass-pages-sent"][0].as_f64(), e["pass-time-us"][0].as_f64()) {
                (Some(n), Some(us)) if us > 0.0 && src.is_null() => format!("{:.0}k (pass 0)", n / us * 1e3),
                _ => "-".into(),
            },
        };
        let side = |v: &Value| {
            if v.is_object() {
                format!("{}, {} / {}", v["requests"], v["pages-pushed"], v["pages-requested"])
            } else {
                "-".into()
            }
        };
        let link = match r["params"]["max-bandwidth"].as_u64() {
            Some(b) if b > 0 => format!(", {} MiB/s", b >> 20),
            _ => ", uncapped".into(),
        };
        md += &format!(
            "| {}{link} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["scenario"].as_str().unwrap_or("?"),
            r["vmm"].as_str().unwrap_or("?"),
            r["round"],
            num(&r["downtime-ms"], 2),
            breakdown,
            src["owed-at-switchover"].as_u64().map(|n| n.to_string()).unwrap_or("-".into()),
            per_s,
            side(src),
            side(dst),
        );
    }
    md
}

/// "met" or "not met", counted in `tally` (met, measured).
fn verdict(ok: bool, tally: &mut (usize, usize)) -> &'static str {
    tally.1 += 1;
    if ok {
        tally.0 += 1;
        "met"
    } else {
        "not met"
    }
}
