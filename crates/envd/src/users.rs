//! User and group lookups from `/etc/passwd` and `/etc/group`.
//!
//! envd is linked statically against glibc, where NSS functions such as `getpwnam` load
//! shared modules at run time and fail or crash, so the files are parsed here.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user {0:?} not found in /etc/passwd")]
    NotFound(String),
    #[error("failed to read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// An account from `/etc/passwd` with its supplementary groups from `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
    /// Supplementary group ids, the primary group included.
    pub groups: Vec<u32>,
}

const PASSWD_PATH: &str = "/etc/passwd";
const GROUP_PATH: &str = "/etc/group";

fn read(path: &'static str) -> Result<String, UserError> {
    std::fs::read_to_string(path).map_err(|source| UserError::Read { path, source })
}

/// Looks up a user by name in `/etc/passwd`.
pub fn lookup_user(name: &str) -> Result<User, UserError> {
    let passwd = read(PASSWD_PATH)?;
    let groups = read(GROUP_PATH).unwrap_or_default();
    parse_user(&passwd, &groups, name).ok_or_else(|| UserError::NotFound(name.to_string()))
}

fn parse_user(passwd: &str, groups: &str, name: &str) -> Option<User> {
    let line = passwd
        .lines()
        .find(|line| line.split(':').next() == Some(name))?;
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() < 7 {
        return None;
    }
    let uid = fields[2].parse().ok()?;
    let gid = fields[3].parse().ok()?;
    let mut supplementary = vec![gid];
    for group_line in groups.lines() {
        let group_fields: Vec<&str> = group_line.split(':').collect();
        if group_fields.len() < 4 {
            continue;
        }
        let Ok(group_id) = group_fields[2].parse::<u32>() else {
            continue;
        };
        let is_member = group_fields[3].split(',').any(|member| member.trim() == name);
        if is_member && !supplementary.contains(&group_id) {
            supplementary.push(group_id);
        }
    }
    Some(User {
        name: name.to_string(),
        uid,
        gid,
        home: PathBuf::from(fields[5]),
        shell: fields[6].to_string(),
        groups: supplementary,
    })
}

/// Names of users and groups by id, for the owner and group fields of file entries.
#[derive(Debug, Default)]
pub struct NameTable {
    users: Vec<(u32, String)>,
    groups: Vec<(u32, String)>,
}

impl NameTable {
    /// Reads both files; a missing file leaves ids unnamed.
    pub fn load() -> Self {
        Self {
            users: parse_names(&read(PASSWD_PATH).unwrap_or_default()),
            groups: parse_names(&read(GROUP_PATH).unwrap_or_default()),
        }
    }

    /// Returns the user name of `uid`, or the number as text when it has no name.
    pub fn user_name(&self, uid: u32) -> String {
        find_name(&self.users, uid)
    }

    /// Returns the group name of `gid`, or the number as text when it has no name.
    pub fn group_name(&self, gid: u32) -> String {
        find_name(&self.groups, gid)
    }
}

fn parse_names(text: &str) -> Vec<(u32, String)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id = fields.nth(1)?.parse().ok()?;
            Some((id, name.to_string()))
        })
        .collect()
}

fn find_name(table: &[(u32, String)], id: u32) -> String {
    table
        .iter()
        .find(|(entry_id, _)| *entry_id == id)
        .map(|(_, name)| name.clone())
        .unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:user\nuser:x:1000:\ndocker:x:999:other,user\n";

    #[test]
    fn parse_user_reads_fields_and_groups() {
        let user = parse_user(PASSWD, GROUP, "user").unwrap();
        assert_eq!(user.uid, 1000);
        assert_eq!(user.gid, 1000);
        assert_eq!(user.home, PathBuf::from("/home/user"));
        assert_eq!(user.groups, vec![1000, 27, 999]);
    }

    #[test]
    fn parse_user_missing_is_none() {
        assert!(parse_user(PASSWD, GROUP, "nobody").is_none());
        assert!(parse_user(PASSWD, GROUP, "use").is_none());
    }

    #[test]
    fn name_table_falls_back_to_number() {
        let users = parse_names(PASSWD);
        assert_eq!(find_name(&users, 1000), "user");
        assert_eq!(find_name(&users, 4242), "4242");
    }
}
