//! Kernel module dependencies, read from each module's `.modinfo` ELF section.
//!
//! Debian's kernel package ships no `modules.dep` (`depmod` creates it at install time and
//! the host may not have `depmod`), so the builder reads the `depends=` entries itself and
//! writes a `modules.dep` for the modules it puts into the initramfs.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Errors resolving modules.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("failed to read kernel module {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel module {0} is not a valid ELF64 file or has no .modinfo section")]
    InvalidElf(PathBuf),
    #[error("kernel module {name} not found under {dir}")]
    NotFound { name: String, dir: PathBuf },
}

/// A module to load, with its path relative to `lib/modules/<release>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedModule {
    /// Module name with `_` separators.
    pub name: String,
    /// Path relative to the modules directory, e.g. `kernel/fs/ext4/ext4.ko`.
    pub relative_path: PathBuf,
    /// Names of the modules it depends on.
    pub depends: Vec<String>,
}

/// Canonical module name: the kernel treats `-` and `_` alike.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Resolves `required` and everything they depend on, in load order (dependencies first).
pub fn resolve_modules(modules_dir: &Path, required: &[&str]) -> Result<Vec<ResolvedModule>, ModuleError> {
    let index = index_modules(modules_dir)?;
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in required {
        visit(modules_dir, &index, &normalize(name), &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit(
    modules_dir: &Path,
    index: &BTreeMap<String, PathBuf>,
    name: &str,
    seen: &mut HashSet<String>,
    order: &mut Vec<ResolvedModule>,
) -> Result<(), ModuleError> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let relative_path = index.get(name).ok_or_else(|| ModuleError::NotFound {
        name: name.to_owned(),
        dir: modules_dir.to_owned(),
    })?;
    let path = modules_dir.join(relative_path);
    let data = std::fs::read(&path).map_err(|source| ModuleError::Read { path: path.clone(), source })?;
    let depends: Vec<String> = modinfo(&data)
        .ok_or_else(|| ModuleError::InvalidElf(path.clone()))?
        .into_iter()
        .filter_map(|entry| entry.strip_prefix("depends=").map(str::to_owned))
        .flat_map(|list| list.split(',').filter(|dep| !dep.is_empty()).map(normalize).collect::<Vec<_>>())
        .collect();
    for dep in &depends {
        visit(modules_dir, index, dep, seen, order)?;
    }
    order.push(ResolvedModule { name: name.to_owned(), relative_path: relative_path.clone(), depends });
    Ok(())
}

/// Maps module names to their paths relative to `modules_dir`.
fn index_modules(modules_dir: &Path) -> Result<BTreeMap<String, PathBuf>, ModuleError> {
    let mut index = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| ModuleError::Read { path: dir.clone(), source })?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                let relative = path.strip_prefix(modules_dir).expect("walked from modules_dir").to_owned();
                index.insert(normalize(stem), relative);
            }
        }
    }
    Ok(index)
}

/// Renders `modules.dep` lines for `modules` (all paths relative to the modules directory).
pub fn render_modules_dep(modules: &[ResolvedModule]) -> String {
    let by_name: BTreeMap<&str, &ResolvedModule> = modules.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut out = String::new();
    for module in modules {
        out.push_str(&module.relative_path.to_string_lossy());
        out.push(':');
        for dep in &module.depends {
            if let Some(dep) = by_name.get(dep.as_str()) {
                out.push(' ');
                out.push_str(&dep.relative_path.to_string_lossy());
            }
        }
        out.push('\n');
    }
    out
}

/// Returns the NUL-separated `key=value` strings of the `.modinfo` section of an ELF64
/// little-endian file, or `None` if the file is not one or has no such section.
pub fn modinfo(elf: &[u8]) -> Option<Vec<String>> {
    let u16_at = |at: usize| elf.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |at: usize| elf.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    let u64_at = |at: usize| elf.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);

    // ELF64, little endian.
    if elf.get(0..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let section_headers = u64_at(0x28)?;
    let entry_size = u16_at(0x3A)?;
    let count = u16_at(0x3C)?;
    let names_index = u16_at(0x3E)?;
    let header = |index: usize| section_headers + index * entry_size;
    let names_offset = u64_at(header(names_index) + 24)?;

    for index in 0..count {
        let name_offset = names_offset + u32_at(header(index))?;
        let name_end = name_offset + elf.get(name_offset..)?.iter().position(|&b| b == 0)?;
        if &elf[name_offset..name_end] != b".modinfo" {
            continue;
        }
        let offset = u64_at(header(index) + 24)?;
        let size = u64_at(header(index) + 32)?;
        let section = elf.get(offset..offset + size)?;
        let entries = section
            .split(|&b| b == 0)
            .filter(|entry| !entry.is_empty())
            .map(|entry| String::from_utf8_lossy(entry).into_owned())
            .collect();
        return Some(entries);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_modules_dep_lists_known_dependencies() {
        let modules = vec![
            ResolvedModule { name: "a".into(), relative_path: "kernel/a.ko".into(), depends: vec![] },
            ResolvedModule { name: "b".into(), relative_path: "kernel/x/b.ko".into(), depends: vec!["a".into()] },
        ];

        assert_eq!(render_modules_dep(&modules), "kernel/a.ko:\nkernel/x/b.ko: kernel/a.ko\n");
    }

    #[test]
    fn modinfo_rejects_non_elf() {
        assert_eq!(modinfo(b"not an elf file at all"), None);
    }
}
