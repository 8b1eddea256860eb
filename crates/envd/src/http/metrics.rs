//! `GET /metrics`: CPU, memory and disk usage of the guest, in upstream envd's JSON shape.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::HttpState;
use crate::error::EnvdError;

#[derive(Debug, Serialize)]
pub(super) struct Metrics {
    ts: i64,
    cpu_count: usize,
    cpu_used_pct: f64,
    mem_total: u64,
    mem_used: u64,
    mem_cache: u64,
    mem_total_mib: u64,
    mem_used_mib: u64,
    disk_used: u64,
    disk_total: u64,
}

/// Cumulative CPU jiffies from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CpuSample {
    busy: u64,
    total: u64,
}

impl CpuSample {
    pub(crate) fn read() -> Result<CpuSample, EnvdError> {
        let stat = read_proc("/proc/stat")?;
        parse_cpu(&stat).ok_or_else(|| EnvdError::Internal("unexpected /proc/stat format".into()))
    }
}

pub(super) async fn metrics(State(st): State<Arc<HttpState>>) -> Result<Json<Metrics>, EnvdError> {
    let stat = read_proc("/proc/stat")?;
    let now = parse_cpu(&stat)
        .ok_or_else(|| EnvdError::Internal("unexpected /proc/stat format".into()))?;
    let cpu_count = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    let previous = st.cpu.lock().expect("cpu sample lock").replace(now);
    let cpu_used_pct = previous.map_or(0.0, |p| usage_pct(p, now));

    let mem = parse_meminfo(&read_proc("/proc/meminfo")?)
        .ok_or_else(|| EnvdError::Internal("unexpected /proc/meminfo format".into()))?;
    let disk = nix::sys::statvfs::statvfs("/")
        .map_err(|e| EnvdError::Internal(format!("statvfs /: {e}")))?;
    let frsize = disk.fragment_size() as u64;
    let disk_total = disk.blocks() as u64 * frsize;
    let disk_used = disk_total.saturating_sub(disk.blocks_available() as u64 * frsize);

    Ok(Json(Metrics {
        ts: time::OffsetDateTime::now_utc().unix_timestamp(),
        cpu_count: cpu_count.max(1),
        cpu_used_pct,
        mem_total: mem.total,
        mem_used: mem.used,
        mem_cache: mem.cache,
        mem_total_mib: mem.total / (1024 * 1024),
        mem_used_mib: mem.used / (1024 * 1024),
        disk_used,
        disk_total,
    }))
}

fn read_proc(path: &str) -> Result<String, EnvdError> {
    std::fs::read_to_string(path).map_err(|e| EnvdError::Internal(format!("read {path}: {e}")))
}

/// `cpu user nice system idle iowait irq softirq steal [guest guest_nice]`; guest time is
/// already counted in user and nice.
fn parse_cpu(stat: &str) -> Option<CpuSample> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuSample {
        busy: total - idle,
        total,
    })
}

/// Busy share of the CPU time between two samples, in percent with two decimals (gopsutil's
/// `cpu.Percent(0, false)`).
fn usage_pct(before: CpuSample, after: CpuSample) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = after.busy.saturating_sub(before.busy);
    let pct = (busy as f64 / total as f64 * 100.0).clamp(0.0, 100.0);
    (pct * 100.0).round() / 100.0
}

#[derive(Debug, PartialEq, Eq)]
struct Memory {
    total: u64,
    used: u64,
    cache: u64,
}

/// gopsutil's accounting: cached includes reclaimable slab; used = total - free - buffers - cached.
fn parse_meminfo(text: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.split(':').next() == Some(name))?;
        let kib: u64 = line
            .split(':')
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    let total = field("MemTotal")?;
    let free = field("MemFree")?;
    let buffers = field("Buffers").unwrap_or(0);
    let cache = field("Cached").unwrap_or(0) + field("SReclaimable").unwrap_or(0);
    let used = total
        .saturating_sub(free)
        .saturating_sub(buffers)
        .saturating_sub(cache);
    Some(Memory { total, used, cache })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computes_cpu_usage() {
        let a = parse_cpu("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = parse_cpu("cpu  150 0 150 800 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(usage_pct(a, b), 50.0);
        assert_eq!(usage_pct(b, b), 0.0);
        assert!(parse_cpu("nothing").is_none());
    }

    #[test]
    fn parses_meminfo() {
        let m = parse_meminfo(
            "MemTotal:       1000 kB\nMemFree:         200 kB\nBuffers:          50 kB\nCached:          100 kB\nSReclaimable:     50 kB\n",
        )
        .unwrap();
        assert_eq!(
            m,
            Memory {
                total: 1_024_000,
                used: 600 * 1024,
                cache: 150 * 1024
            }
        );
    }
}
