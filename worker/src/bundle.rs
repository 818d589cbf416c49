//! OCI bundles for runsc, generated with the `oci-spec` crate.
//!
//! A template has one [`BundleSpec`]; each sandbox gets its own copy of the bundle's
//! `config.json`, which differs only in the cgroup path, so the worker can hold every sandbox to
//! its own limits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount,
    MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

/// Where the project's entry script directory is mounted inside every sandbox.
pub const ENTRY_MOUNT: &str = "/opt/shardbox";

/// Why a bundle could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// oci-spec refused a value.
    #[error("cannot build the OCI spec")]
    Spec(#[from] oci_spec::OciSpecError),
    /// The bundle directory could not be written.
    #[error("cannot write bundle {path}")]
    Write {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What goes into a template's bundle.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    /// Root filesystem, mounted read-only.
    pub rootfs: PathBuf,
    /// Entrypoint argv.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// The jobs' work directory (an in-memory tmpfs).
    pub workdir: String,
    /// User id inside the sandbox.
    pub uid: u32,
    /// Group id inside the sandbox.
    pub gid: u32,
    /// Host directory holding the entry script, mounted read-only at [`ENTRY_MOUNT`].
    pub entry_dir: PathBuf,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Host task limit.
    pub pids: u64,
    /// Whether the entrypoint supervises jobs as processes of other users, which needs the
    /// capabilities to change user, give files away and signal and clean up after them. The
    /// jobs themselves run without any capability.
    pub supervisor: bool,
}

impl BundleSpec {
    /// The OCI spec for one sandbox of this template, in cgroup `cgroups_path`.
    ///
    /// # Errors
    /// [`BundleError::Spec`].
    pub fn to_oci(&self, cgroups_path: &str) -> Result<Spec, BundleError> {
        let mut env =
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()];
        env.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        let process = ProcessBuilder::default()
            .terminal(false)
            .args(self.args.clone())
            .env(env)
            .cwd("/")
            .user(UserBuilder::default().uid(self.uid).gid(self.gid).build()?)
            .no_new_privileges(true)
            .build()?;
        let mut process = process;
        if self.supervisor {
            // The supervisor gives each job its user id, directory and signals, and mounts
            // gVisor's own pids cgroup controller (SysAdmin: the sandbox's kernel, not the
            // host's) to hold each job to its process limit. Jobs drop them all when they take
            // their user id.
            let caps: Capabilities = [
                Capability::Chown,
                Capability::DacOverride,
                Capability::Fowner,
                Capability::Kill,
                Capability::Setuid,
                Capability::Setgid,
                Capability::SysAdmin,
            ]
            .into_iter()
            .collect();
            process.set_capabilities(Some(
                LinuxCapabilitiesBuilder::default()
                    .bounding(caps.clone())
                    .effective(caps.clone())
                    .permitted(caps)
                    .inheritable(Capabilities::new())
                    .ambient(Capabilities::new())
                    .build()?,
            ));
        }
        let mut spec = Spec::default();
        spec.set_hostname(Some("shardbox".into()));
        spec.set_process(Some(process));
        spec.set_root(Some(
            RootBuilder::default()
                .path(&self.rootfs)
                .readonly(true)
                .build()?,
        ));

        // The usual /proc, /dev and /sys mounts, without a cgroup filesystem, plus in-memory
        // /tmp and work directory, and the entry script read-only.
        let mut mounts: Vec<Mount> = spec
            .mounts()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.typ().as_deref() != Some("cgroup"))
            .collect();
        for dir in ["/tmp", self.workdir.as_str()] {
            mounts.push(
                MountBuilder::default()
                    .destination(dir)
                    .typ("tmpfs")
                    .source("tmpfs")
                    .options(vec!["nosuid".into(), "nodev".into(), "mode=1777".into()])
                    .build()?,
            );
        }
        mounts.push(
            MountBuilder::default()
                .destination(ENTRY_MOUNT)
                .typ("bind")
                .source(&self.entry_dir)
                .options(vec!["rbind".into(), "ro".into()])
                .build()?,
        );
        spec.set_mounts(Some(mounts));

        let namespaces = [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Mount,
        ]
        .into_iter()
        .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
        .collect::<Result<Vec<_>, _>>()?;
        let resources = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(self.memory_bytes as i64)
                    .build()?,
            )
            .pids(
                LinuxPidsBuilder::default()
                    .limit(self.pids as i64)
                    .build()?,
            )
            .build()?;
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .resources(resources)
            .cgroups_path(cgroups_path)
            .masked_paths(
                spec.linux()
                    .as_ref()
                    .and_then(|l| l.masked_paths().clone())
                    .unwrap_or_default(),
            )
            .readonly_paths(
                spec.linux()
                    .as_ref()
                    .and_then(|l| l.readonly_paths().clone())
                    .unwrap_or_default(),
            )
            .build()?;
        spec.set_linux(Some(linux));
        Ok(spec)
    }

    /// Writes the bundle of one sandbox into `dir` (created if needed).
    ///
    /// # Errors
    /// [`BundleError`].
    pub fn write(&self, dir: &Path, cgroups_path: &str) -> Result<(), BundleError> {
        let spec = self.to_oci(cgroups_path)?;
        std::fs::create_dir_all(dir).map_err(|source| BundleError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let text = serde_json::to_vec_pretty(&spec).map_err(|e| BundleError::Write {
            path: dir.to_owned(),
            source: std::io::Error::other(e),
        })?;
        let path = dir.join("config.json");
        std::fs::write(&path, text).map_err(|source| BundleError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_has_limits_mounts_and_no_network_namespace_leak() {
        let bundle = BundleSpec {
            rootfs: "/r".into(),
            args: vec!["python3".into(), "/opt/shardbox/entry.py".into()],
            env: BTreeMap::from([("A".into(), "b".into())]),
            workdir: "/work".into(),
            uid: 1000,
            gid: 1000,
            entry_dir: "/state/entry".into(),
            memory_bytes: 256 << 20,
            pids: 64,
            supervisor: false,
        };
        let json = serde_json::to_value(bundle.to_oci("/shardbox/w/s1").unwrap()).unwrap();
        assert_eq!(json["root"]["readonly"], true);
        assert_eq!(json["process"]["user"]["uid"], 1000);
        assert_eq!(json["linux"]["cgroupsPath"], "/shardbox/w/s1");
        assert_eq!(json["linux"]["resources"]["memory"]["limit"], 256 << 20);
        assert_eq!(json["linux"]["resources"]["pids"]["limit"], 64);
        let mounts = json["mounts"].as_array().unwrap();
        let dests: Vec<&str> = mounts
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert!(
            dests.contains(&"/work") && dests.contains(&"/tmp"),
            "{dests:?}"
        );
        assert!(!dests.contains(&"/sys/fs/cgroup"), "{dests:?}");
        let entry = mounts
            .iter()
            .find(|m| m["destination"] == ENTRY_MOUNT)
            .unwrap();
        assert!(entry["options"].as_array().unwrap().contains(&"ro".into()));
        let env = json["process"]["env"].as_array().unwrap();
        assert!(env.contains(&"A=b".into()));
        let ns: Vec<&str> = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(ns.contains(&"network"), "{ns:?}");
    }
}
