//! What the benchmark reads about processes from `/proc`: resident memory and CPU time of a
//! process and its descendants, and how busy the whole machine was.

use std::ops::{AddAssign, Sub};

use anyhow::Context;

/// `/proc` reports CPU times in clock ticks of `USER_HZ`, which Linux fixes at 100 per second
/// on every architecture it supports for this interface.
const TICKS_PER_SEC: f64 = 100.0;

/// `pid` and every process descended from it.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(child).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                parents.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree
}

/// The fields of `/proc/<pid>/stat` after the parenthesised command name (so the state is
/// field 0 and the parent pid field 1).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = stat.rsplit_once(')')?;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// Resident memory in KiB of `pid` and all its descendants.
pub fn tree_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for p in process_tree(pid) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status"))
            .with_context(|| format!("cannot read the memory of process {p}"))?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("process {p} reports no VmRSS"))?;
        total += rss;
    }
    Ok(total)
}

/// CPU seconds (user and system, all threads) used so far by the process `pid` alone.
fn cpu_secs(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15 of the whole line, 11 and 12 here.
    let ticks = stat_fields(pid)
        .and_then(|f| Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?));
    ticks.unwrap_or(0) as f64 / TICKS_PER_SEC
}

/// CPU seconds used so far by `pid` and its descendants.
pub fn tree_cpu_secs(pid: u32) -> f64 {
    process_tree(pid).into_iter().map(cpu_secs).sum()
}

/// CPU seconds all CPUs of the machine have spent busy (not idle, not waiting for I/O) so far.
pub fn machine_busy_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy as f64 / TICKS_PER_SEC
}

/// CPU seconds spent during a measurement: by the proxy's processes, by the load generator and
/// the upstream servers, and by the machine as a whole.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuUse {
    pub proxy: f64,
    pub load: f64,
    pub machine: f64,
}

impl Sub for CpuUse {
    type Output = CpuUse;
    fn sub(self, before: CpuUse) -> CpuUse {
        CpuUse {
            proxy: self.proxy - before.proxy,
            load: self.load - before.load,
            machine: self.machine - before.machine,
        }
    }
}

impl AddAssign for CpuUse {
    fn add_assign(&mut self, other: CpuUse) {
        self.proxy += other.proxy;
        self.load += other.load;
        self.machine += other.machine;
    }
}

/// Reads [`CpuUse`] for one proxy process (none on the direct path) and the load side: this
/// process (the load generator, with the HTTP origin and the event-stream server) and the
/// upstream servers' processes (the echo servers, nginx).
pub struct CpuMeter {
    pub upstream_pids: Vec<u32>,
}

impl CpuMeter {
    pub fn read(&self, proxy_pid: Option<u32>) -> CpuUse {
        // This process alone: the peers and the echo server are its children.
        let own = cpu_secs(std::process::id());
        CpuUse {
            proxy: proxy_pid.map_or(0.0, tree_cpu_secs),
            load: own
                + self
                    .upstream_pids
                    .iter()
                    .copied()
                    .map(tree_cpu_secs)
                    .sum::<f64>(),
            machine: machine_busy_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_uses_cpu_and_memory() {
        // Burn a little CPU so the tick counter moves.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert!(x != 1);
        assert!(tree_cpu_secs(std::process::id()) > 0.0);
        assert!(tree_rss_kib(std::process::id()).unwrap() > 0);
        assert!(machine_busy_secs() > 0.0);
    }
}
