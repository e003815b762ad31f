//! Server metrics and machine facts from `/proc`: RSS (`VmRSS`, `VmHWM`), CPU time
//! (`utime + stime` in clock ticks), cores, memory and kernel.

use serde::Serialize;

/// A process's memory and CPU at one instant.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcSample {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// user + system CPU time, in seconds.
    pub cpu_secs: f64,
}

/// `VmRSS` (or another `Vm*` line) of a `/proc/<pid>/status` text, in KiB.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `utime + stime` (clock ticks) of a `/proc/<pid>/stat` line. The command name (field 2) is
/// in parentheses and may contain spaces, so fields are counted after the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After ')' come field 3 (state) … ; utime is field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The command name (field 2, in parentheses) of a `/proc/<pid>/stat` line.
pub fn parse_stat_comm(stat: &str) -> Option<&str> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    stat.get(open + 1..close)
}

/// CPU seconds used so far by every process whose command name is `comm` (e.g. `postgres`:
/// the database server's own cost, outside the server under test), and how many there are.
pub fn cpu_secs_of_comm(comm: &str) -> (f64, usize) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0.0, 0);
    };
    let (mut ticks, mut n) = (0u64, 0usize);
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if parse_stat_comm(&stat) == Some(comm)
            && let Some(t) = parse_stat_ticks(&stat)
        {
            ticks += t;
            n += 1;
        }
    }
    (ticks as f64 / clock_ticks(), n)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux in practice).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Samples `pid`; `None` once the process is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(ProcSample {
        rss_kib: parse_status_kib(&status, "VmRSS")?,
        hwm_kib: parse_status_kib(&status, "VmHWM").unwrap_or(0),
        cpu_secs: parse_stat_ticks(&stat)? as f64 / clock_ticks(),
    })
}

/// The machine a run was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
    pub kernel: String,
}

pub fn parse_cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_default()
}

pub fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: parse_cpu_model(&read("/proc/cpuinfo")),
        mem_total_kib: parse_status_kib(&read("/proc/meminfo"), "MemTotal").unwrap_or(0),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let s = "Name:\therald\nVmPeak:\t  99 kB\nVmHWM:\t   8000 kB\nVmRSS:\t    7168 kB\n";
        assert_eq!(parse_status_kib(s, "VmRSS"), Some(7168));
        assert_eq!(parse_status_kib(s, "VmHWM"), Some(8000));
        assert_eq!(parse_status_kib(s, "VmSwap"), None);
        let m = "MemTotal:       24684544 kB\nMemFree: 1 kB\n";
        assert_eq!(parse_status_kib(m, "MemTotal"), Some(24_684_544));
    }

    #[test]
    fn stat_ticks_with_spaces_in_name() {
        let stat = "1234 (her ald) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 3 0 \
                    100 2000000 1800 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(parse_stat_comm(stat), Some("her ald"));
        assert_eq!(parse_stat_comm("garbage"), None);
    }

    #[test]
    fn own_process_is_sampled() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kib > 0);
        assert!(clock_ticks() > 0.0);
        let stat = std::fs::read_to_string("/proc/self/stat").expect("own stat");
        let comm = parse_stat_comm(&stat).expect("own comm").to_owned();
        assert!(cpu_secs_of_comm(&comm).1 >= 1);
    }

    #[test]
    fn cpu_model() {
        let c = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: x\n";
        assert_eq!(parse_cpu_model(c), "AMD EPYC 7B13");
    }
}
