//! Guest RAM diffs: the pages a privately mapped sandbox changed, read from QEMU's page
//! tables.
//!
//! A restored sandbox maps its template's memory file `MAP_PRIVATE`. A page the guest (or we)
//! wrote is copy-on-write: it becomes an anonymous page of the QEMU process, while pages never
//! written stay page-cache pages of the file (or are not mapped at all). `/proc/<pid>/pagemap`
//! tells the two apart (bit 61, "file page or shared anon"), so with the VM stopped the host
//! finds exactly the changed pages without QEMU walking guest RAM, and reads them from
//! `/proc/<pid>/mem`. On resume the pages are written back the same way into a new QEMU that
//! maps the same template file privately and is still waiting in `-incoming defer` (so it has
//! not loaded ROMs into RAM and no vCPU runs); they become anonymous again, so every later diff
//! holds all pages that differ from the template.
//!
//! A sandbox started from a named snapshot has the snapshot's diffs written in first, its
//! *base* (oldest first: a snapshot of a sandbox that started from a snapshot has that one's
//! below its own). Its saves leave out the pages that still read as the base has them, so a
//! snapshot of it stores only what changed since, and its resume writes the base, then its
//! own diff. The base files are never written again (the snapshot keeps them while anything is
//! layered on it).
//!
//! File format (little endian): magic `WRNMDIF1`, `u32` page size, `u32` zero, `u64` RAM bytes,
//! `u64` run count, then `(u64 first page, u64 page count)` per run in ascending order, then
//! the pages of every run back to back.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Guest and host page size (x86_64).
pub(crate) const PAGE: u64 = 4096;
const MAGIC: &[u8; 8] = b"WRNMDIF1";
const HEADER: u64 = 8 + 4 + 4 + 8 + 8;
/// Pages are copied in chunks of this size.
const CHUNK: u64 = 4 << 20;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// Why reading or applying a memory diff failed.
#[derive(Debug, thiserror::Error)]
pub enum MemDiffError {
    /// QEMU has no mapping of the memory file of that size.
    #[error("guest RAM mapping of {path} ({bytes} bytes) not found in QEMU process {pid}")]
    NoMapping {
        /// QEMU's pid.
        pid: u32,
        /// The memory file.
        path: PathBuf,
        /// The expected size.
        bytes: u64,
    },
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The diff file is not what its manifest says, or not a diff at all.
    #[error("memory diff {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MemDiffError {
    let path = path.to_owned();
    move |source| MemDiffError::Io { what, path, source }
}

/// What a written diff holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiffInfo {
    /// Changed pages.
    pub pages: u64,
    /// File size.
    pub bytes: u64,
    /// sha256 of the whole file, hex.
    pub sha256: String,
}

/// A diff a sandbox's memory was restored from before its own: its saves leave out the pages
/// that read as it has them.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    /// The diff file.
    pub path: PathBuf,
    /// What it holds (checked when it is applied).
    pub info: DiffInfo,
}

/// The address range of guest RAM inside QEMU.
#[derive(Debug, Clone, Copy)]
struct RamMapping {
    start: u64,
    len: u64,
}

/// Finds the mapping of `mem_file` at offset 0 with length `len` in `/proc/<pid>/maps`, by
/// device and inode (QEMU runs in a mount namespace of its own, where the path it shows is
/// its own view of the file), or failing that by path (overlayfs shows the inode of the layer
/// below; the jail binds the file at its host path).
fn find_ram_mapping(pid: u32, mem_file: &Path, len: u64) -> Result<RamMapping, MemDiffError> {
    use std::os::unix::fs::MetadataExt as _;
    let not_found = || MemDiffError::NoMapping {
        pid,
        path: mem_file.to_owned(),
        bytes: len,
    };
    let meta = std::fs::metadata(mem_file).map_err(io("stat", mem_file))?;
    let want = (libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino());
    let want_path = std::fs::canonicalize(mem_file).map_err(io("resolve", mem_file))?;
    let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = std::fs::read_to_string(&maps_path).map_err(io("read", &maps_path))?;
    for line in maps.lines() {
        // start-end perms offset major:minor inode path (the path may contain spaces).
        let mut fields = line.splitn(6, ' ');
        let (Some(range), Some(_perms), Some(offset), Some(dev), Some(inode), path) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next().map(str::trim_start),
        ) else {
            continue;
        };
        let Some((maj, min)) = dev.split_once(':') else {
            continue;
        };
        let same = (u32::from_str_radix(maj, 16) == Ok(want.0)
            && u32::from_str_radix(min, 16) == Ok(want.1)
            && inode.parse::<u64>() == Ok(want.2))
            || path.is_some_and(|p| Path::new(p) == want_path);
        if !same || u64::from_str_radix(offset, 16) != Ok(0) {
            continue;
        }
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
            continue;
        };
        if e - s == len {
            return Ok(RamMapping { start: s, len });
        }
    }
    Err(not_found())
}

/// The runs of pages of the mapping that are anonymous (written since the mapping was made).
fn dirty_runs(pid: u32, ram: RamMapping) -> Result<Vec<(u64, u64)>, MemDiffError> {
    let path = PathBuf::from(format!("/proc/{pid}/pagemap"));
    let f = File::open(&path).map_err(io("open", &path))?;
    let pages = ram.len / PAGE;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; 8 * 8192];
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(8192);
        let bytes = &mut buf[..(n * 8) as usize];
        f.read_exact_at(bytes, (ram.start / PAGE + page) * 8)
            .map_err(io("read", &path))?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(entry.try_into().unwrap_or_default());
            let dirty = (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0;
            if !dirty {
                continue;
            }
            let p = page + i as u64;
            match runs.last_mut() {
                Some((first, count)) if *first + *count == p => *count += 1,
                _ => runs.push((p, 1)),
            }
        }
        page += n;
    }
    Ok(runs)
}

/// Writes the pages QEMU `pid` changed in its private mapping of `mem_file` (`ram_bytes`
/// long) to `out`, synced, leaving out those that read as `base` (the diffs its memory was
/// restored from, oldest first) has them. The VM must be stopped.
pub(crate) fn save(
    pid: u32,
    mem_file: &Path,
    ram_bytes: u64,
    base: &[Layer],
    out: &Path,
) -> Result<DiffInfo, MemDiffError> {
    let ram = find_ram_mapping(pid, mem_file, ram_bytes)?;
    let mem_path = PathBuf::from(format!("/proc/{pid}/mem"));
    let mem = File::open(&mem_path).map_err(io("open", &mem_path))?;
    let dirty = dirty_runs(pid, ram)?;
    let runs = if base.is_empty() {
        dirty
    } else {
        let index = BaseIndex::open(base, ram_bytes)?;
        index.changed(&dirty, &mem, &mem_path, ram)?
    };
    write_diff(&runs, &mem, &mem_path, ram, out)
}

/// Writes a diff of no pages (a sandbox whose memory is exactly its base) to `out`, synced.
pub(crate) fn save_empty(ram_bytes: u64, out: &Path) -> Result<DiffInfo, MemDiffError> {
    let mem_path = PathBuf::from("/dev/null");
    let mem = File::open(&mem_path).map_err(io("open", &mem_path))?;
    let ram = RamMapping {
        start: 0,
        len: ram_bytes,
    };
    write_diff(&[], &mem, &mem_path, ram, out)
}

/// Writes `runs` of the guest RAM `ram` (read from `mem`) as a diff to `out`, synced.
fn write_diff(
    runs: &[(u64, u64)],
    mem: &File,
    mem_path: &Path,
    ram: RamMapping,
    out: &Path,
) -> Result<DiffInfo, MemDiffError> {
    let ram_bytes = ram.len;
    let mut file = File::create(out).map_err(io("create", out))?;
    let mut hash = Sha256::new();
    let mut header = Vec::with_capacity((HEADER + 16 * runs.len() as u64) as usize);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&(PAGE as u32).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&ram_bytes.to_le_bytes());
    header.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for (first, count) in runs {
        header.extend_from_slice(&first.to_le_bytes());
        header.extend_from_slice(&count.to_le_bytes());
    }
    hash.update(&header);
    file.write_all(&header).map_err(io("write", out))?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pages = 0;
    for &(first, count) in runs {
        let mut off = first * PAGE;
        let end = (first + count) * PAGE;
        while off < end {
            let n = (end - off).min(CHUNK) as usize;
            mem.read_exact_at(&mut buf[..n], ram.start + off)
                .map_err(io("read guest RAM from", mem_path))?;
            hash.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io("write", out))?;
            off += n as u64;
        }
        pages += count;
    }
    file.sync_all().map_err(io("sync", out))?;
    Ok(DiffInfo {
        pages,
        bytes: header.len() as u64 + pages * PAGE,
        sha256: hex::encode(hash.finalize()),
    })
}

/// Checks `diff` against its recorded size and hash, then writes its pages into the private
/// mapping of `mem_file` of QEMU `pid`, which must not be running guest code yet.
pub(crate) fn apply(
    pid: u32,
    mem_file: &Path,
    ram_bytes: u64,
    diff: &Path,
    expect: &DiffInfo,
) -> Result<(), MemDiffError> {
    let corrupt = |reason: String| MemDiffError::Corrupt {
        path: diff.to_owned(),
        reason,
    };
    let len = std::fs::metadata(diff).map_err(io("stat", diff))?.len();
    if len != expect.bytes {
        return Err(corrupt(format!(
            "{len} bytes, the manifest says {}",
            expect.bytes
        )));
    }
    // Hash first: nothing goes into the VM from a file that fails it.
    let mut hash = Sha256::new();
    let mut r =
        BufReader::with_capacity(CHUNK as usize, File::open(diff).map_err(io("open", diff))?);
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        let n = r.read(&mut buf).map_err(io("read", diff))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    if hex::encode(hash.finalize()) != expect.sha256 {
        return Err(corrupt("sha256 does not match the manifest".into()));
    }
    let f = File::open(diff).map_err(io("open", diff))?;
    let (runs, pages) = read_runs(&f, diff, ram_bytes, len)?;
    if pages != expect.pages {
        return Err(corrupt(format!(
            "{pages} pages, the manifest says {}",
            expect.pages
        )));
    }
    let ram = find_ram_mapping(pid, mem_file, ram_bytes)?;
    let mem_path = PathBuf::from(format!("/proc/{pid}/mem"));
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(&mem_path)
        .map_err(io("open", &mem_path))?;
    let mut at = HEADER + runs.len() as u64 * 16;
    for (first, count) in runs {
        let mut off = first * PAGE;
        let end = (first + count) * PAGE;
        while off < end {
            let n = (end - off).min(CHUNK) as usize;
            f.read_exact_at(&mut buf[..n], at)
                .map_err(io("read", diff))?;
            mem.write_all_at(&buf[..n], ram.start + off)
                .map_err(io("write guest RAM to", &mem_path))?;
            off += n as u64;
            at += n as u64;
        }
    }
    Ok(())
}

/// The runs of diff `f` (`path`, `len` bytes, for `ram_bytes` of RAM) and how many pages they
/// hold, checked against the file's size.
fn read_runs(
    f: &File,
    path: &Path,
    ram_bytes: u64,
    len: u64,
) -> Result<(Vec<(u64, u64)>, u64), MemDiffError> {
    let corrupt = |reason: String| MemDiffError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let mut head = [0u8; HEADER as usize];
    f.read_exact_at(&mut head, 0).map_err(io("read", path))?;
    let u64_at =
        |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
    if &head[..8] != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let page = u32::from_le_bytes(head[8..12].try_into().unwrap_or([0; 4]));
    if u64::from(page) != PAGE || u64_at(&head, 16) != ram_bytes {
        return Err(corrupt(format!(
            "page size {page} and RAM {} do not match this machine",
            u64_at(&head, 16)
        )));
    }
    let nruns = u64_at(&head, 24);
    if nruns > ram_bytes / PAGE || HEADER + nruns * 16 > len {
        return Err(corrupt(format!("{nruns} runs do not fit")));
    }
    let mut table = vec![0u8; (nruns * 16) as usize];
    f.read_exact_at(&mut table, HEADER)
        .map_err(io("read", path))?;
    let mut runs = Vec::with_capacity(nruns as usize);
    let (mut next_free, mut pages) = (0u64, 0u64);
    for r in table.chunks_exact(16) {
        let (first, count) = (u64_at(r, 0), u64_at(r, 8));
        if count == 0 || first < next_free || first.saturating_add(count) > ram_bytes / PAGE {
            return Err(corrupt(format!("bad run {first}+{count}")));
        }
        next_free = first + count;
        pages += count;
        runs.push((first, count));
    }
    if HEADER + nruns * 16 + pages * PAGE != len {
        return Err(corrupt("runs do not match the file size".into()));
    }
    Ok((runs, pages))
}

/// Where each page of a base (its newest layer holding it) is, to compare saved pages with.
struct BaseIndex {
    files: Vec<(File, PathBuf)>,
    /// Per guest page: the layer (index into `files`) and offset of its bytes there.
    at: Vec<Option<(usize, u64)>>,
}

impl BaseIndex {
    fn open(base: &[Layer], ram_bytes: u64) -> Result<Self, MemDiffError> {
        let mut at = vec![None; (ram_bytes / PAGE) as usize];
        let mut files = Vec::with_capacity(base.len());
        for (i, layer) in base.iter().enumerate() {
            let f = File::open(&layer.path).map_err(io("open", &layer.path))?;
            let len = f.metadata().map_err(io("stat", &layer.path))?.len();
            let (runs, _) = read_runs(&f, &layer.path, ram_bytes, len)?;
            let mut off = HEADER + runs.len() as u64 * 16;
            for (first, count) in runs {
                for p in first..first + count {
                    at[p as usize] = Some((i, off));
                    off += PAGE;
                }
            }
            files.push((f, layer.path.clone()));
        }
        Ok(Self { files, at })
    }

    /// The runs of pages to save: those `dirty` that the base does not hold, and those the base
    /// holds that read differently now (the guest's RAM `ram` in `mem`).
    fn changed(
        &self,
        dirty: &[(u64, u64)],
        mem: &File,
        mem_path: &Path,
        ram: RamMapping,
    ) -> Result<Vec<(u64, u64)>, MemDiffError> {
        let mut keep = vec![false; self.at.len()];
        for &(first, count) in dirty {
            for p in first..first + count {
                keep[p as usize] = self.at[p as usize].is_none();
            }
        }
        let (mut now, mut then) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
        for (p, src) in self.at.iter().enumerate() {
            let Some((layer, off)) = *src else { continue };
            let (f, path) = &self.files[layer];
            f.read_exact_at(&mut then, off).map_err(io("read", path))?;
            mem.read_exact_at(&mut now, ram.start + p as u64 * PAGE)
                .map_err(io("read guest RAM from", mem_path))?;
            keep[p] = now != then;
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (p, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
            let p = p as u64;
            match runs.last_mut() {
                Some((first, count)) if *first + *count == p => *count += 1,
                _ => runs.push((p, 1)),
            }
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private, writable mapping of a file in this process (what QEMU does with share=off).
    struct Mapping {
        ptr: *mut u8,
        len: usize,
    }

    impl Mapping {
        fn new(file: &File, len: usize) -> Self {
            use std::os::fd::AsRawFd;
            // SAFETY: a fresh mapping (no address hint) of an open file; checked for failure.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Self {
                ptr: ptr.cast(),
                len,
            }
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping is `len` bytes, readable and writable, and lives as long as self.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping made in `new`, which nothing borrows any more.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    const PAGES: usize = 64;

    fn template(dir: &Path) -> (PathBuf, File) {
        let path = dir.join("memory");
        let mut data = vec![0u8; PAGES * PAGE as usize];
        for (i, page) in data.chunks_mut(PAGE as usize).enumerate() {
            page.fill(i as u8 + 1);
        }
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        (path, file)
    }

    #[test]
    fn finds_written_pages_and_writes_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let (path, file) = template(dir.path());
        let len = PAGES * PAGE as usize;
        let pid = std::process::id();
        let diff = dir.path().join("memory.diff");
        let expected: Vec<u8>;
        let info;
        {
            let mut m = Mapping::new(&file, len);
            let b = m.bytes();
            // Reads do not make pages dirty; writes do (also writing zeros over file data).
            let sum: u64 = b.iter().step_by(PAGE as usize).map(|&x| u64::from(x)).sum();
            assert!(sum > 0);
            b[3 * PAGE as usize + 7] = 0xaa;
            b[4 * PAGE as usize] = 0xbb;
            b[10 * PAGE as usize..11 * PAGE as usize].fill(0);
            b[(PAGES - 1) * PAGE as usize + 5] = 0xcc;
            expected = b.to_vec();
            info = save(pid, &path, len as u64, &[], &diff).unwrap();
        }
        assert_eq!(info.pages, 4, "{info:?}");
        assert_eq!(info.bytes, std::fs::metadata(&diff).unwrap().len());
        assert_eq!(info.bytes, HEADER + 3 * 16 + 4 * PAGE);

        let mut m = Mapping::new(&file, len);
        assert_ne!(m.bytes(), &expected[..]);
        apply(pid, &path, len as u64, &diff, &info).unwrap();
        assert!(m.bytes() == &expected[..], "restored memory differs");
    }

    #[test]
    fn saves_over_a_base_only_what_differs_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, file) = template(dir.path());
        let (len, pg) = (PAGES * PAGE as usize, PAGE as usize);
        let pid = std::process::id();
        let (a, b) = (dir.path().join("a.diff"), dir.path().join("b.diff"));
        let a_info = {
            let mut m = Mapping::new(&file, len);
            for p in [2, 3, 5] {
                m.bytes()[p * pg + 1] = 0x50 + p as u8;
            }
            save(pid, &path, len as u64, &[], &a).unwrap()
        };
        assert_eq!(a_info.pages, 3);
        let base = [Layer {
            path: a.clone(),
            info: a_info.clone(),
        }];
        // A sandbox started from `a`: page 2 dropped (it reads as the template again), page 3
        // changed, page 5 written back to the template's bytes, page 7 new.
        let (expected, b_info) = {
            let mut m = Mapping::new(&file, len);
            apply(pid, &path, len as u64, &a, &a_info).unwrap();
            let bytes = m.bytes();
            // SAFETY: page 2 of the mapping made above, which nothing else references.
            let r = unsafe {
                libc::madvise(bytes[2 * pg..].as_mut_ptr().cast(), pg, libc::MADV_DONTNEED)
            };
            assert_eq!(r, 0);
            bytes[3 * pg + 9] = 0x99;
            bytes[5 * pg + 1] = 6;
            bytes[7 * pg] = 0x77;
            (
                bytes.to_vec(),
                save(pid, &path, len as u64, &base, &b).unwrap(),
            )
        };
        assert_eq!(b_info.pages, 4, "{b_info:?}");
        let (_, pages) = read_runs(&File::open(&b).unwrap(), &b, len as u64, b_info.bytes).unwrap();
        assert_eq!(pages, 4);
        let mut m = Mapping::new(&file, len);
        apply(pid, &path, len as u64, &a, &a_info).unwrap();
        apply(pid, &path, len as u64, &b, &b_info).unwrap();
        assert!(
            m.bytes() == &expected[..],
            "base + diff differs from the saved memory"
        );
        drop(m);
        // Nothing changed since the base: a diff of no pages, as `save_empty` writes.
        let (c, empty) = (dir.path().join("c.diff"), dir.path().join("e.diff"));
        let m = Mapping::new(&file, len);
        apply(pid, &path, len as u64, &a, &a_info).unwrap();
        let c_info = save(pid, &path, len as u64, &base, &c).unwrap();
        let e_info = save_empty(len as u64, &empty).unwrap();
        assert_eq!((c_info.pages, c_info.bytes), (0, HEADER));
        assert_eq!(c_info, e_info);
        apply(pid, &path, len as u64, &empty, &e_info).unwrap();
        drop(m);
    }

    #[test]
    fn rejects_corrupt_or_mismatched_diffs() {
        let dir = tempfile::tempdir().unwrap();
        let (path, file) = template(dir.path());
        let len = PAGES * PAGE as usize;
        let pid = std::process::id();
        let diff = dir.path().join("memory.diff");
        let info = {
            let mut m = Mapping::new(&file, len);
            m.bytes()[PAGE as usize] = 9;
            save(pid, &path, len as u64, &[], &diff).unwrap()
        };
        let _m = Mapping::new(&file, len);
        let mut bytes = std::fs::read(&diff).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&diff, &bytes).unwrap();
        let err = apply(pid, &path, len as u64, &diff, &info).unwrap_err();
        assert!(matches!(err, MemDiffError::Corrupt { .. }), "{err}");
        bytes.truncate(last);
        std::fs::write(&diff, &bytes).unwrap();
        let err = apply(pid, &path, len as u64, &diff, &info).unwrap_err();
        assert!(matches!(err, MemDiffError::Corrupt { .. }), "{err}");
        // No mapping of that size: a clear error, nothing written.
        let err = find_ram_mapping(pid, &path, 2 * len as u64).unwrap_err();
        assert!(matches!(err, MemDiffError::NoMapping { .. }), "{err}");
    }
}
