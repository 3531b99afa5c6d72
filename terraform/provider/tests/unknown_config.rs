//! The provider configured from values Terraform does not know yet: variables (which
//! `terraform validate` sends as unknown, and Terraform 1.6+ as *refined* unknowns: "not
//! null") and another resource's output (unknown until that resource is applied, with a
//! known prefix), under every Terraform this machine has: the one from PyPI (1.0) and the
//! system's own (1.11 here). Each validates, plans, applies, re-plans empty and destroys.

use std::path::Path;

use isthmus_demo::{Demo, DemoOptions};
use support::{terraforms, Workspace, SOURCE};

mod support;

const FIRST: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
"#;

const SECOND: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: details
spec:
  host: details
  subsets:
  - name: v1
    labels: {version: v1}
"#;

/// Two providers: the default one from variables, and `later`, whose `control` is known
/// only once `isthmus_policy.first` exists (its `id`, unknown while its `yaml` is; the yaml
/// waits on `timestamp()`, which Terraform leaves unknown until apply).
fn configuration() -> String {
    format!(
        r#"terraform {{
  required_providers {{
    isthmus = {{ source = "{SOURCE}" }}
  }}
}}

variable "control" {{}}
variable "ca_file" {{}}
variable "cert_file" {{}}
variable "key_file" {{}}

provider "isthmus" {{
  control            = "https://${{var.control}}"
  ca_certificate     = file(var.ca_file)
  client_certificate = file(var.cert_file)
  client_key         = file(var.key_file)
}}

provider "isthmus" {{
  alias              = "later"
  control            = "https://${{var.control}}${{substr(isthmus_policy.first.id, 0, 0)}}"
  ca_certificate     = file(var.ca_file)
  client_certificate = file(var.cert_file)
  client_key         = file(var.key_file)
}}

resource "isthmus_policy" "first" {{
  yaml = "${{local.first}}${{substr(timestamp(), 0, 0)}}"
  lifecycle {{
    ignore_changes = [yaml]
  }}
}}

resource "isthmus_policy" "second" {{
  provider = isthmus.later
  yaml     = local.second
}}

locals {{
  first  = <<EOT
{FIRST}EOT
  second = <<EOT
{SECOND}EOT
}}
"#
    )
}

fn vars(
    control: &str,
    ca_file: &Path,
    (cert, key): &(std::path::PathBuf, std::path::PathBuf),
) -> Vec<String> {
    vec![
        "-var".into(),
        format!("control={control}"),
        "-var".into(),
        format!("ca_file={}", ca_file.display()),
        "-var".into(),
        format!("cert_file={}", cert.display()),
        "-var".into(),
        format!("key_file={}", key.display()),
    ]
}

/// Runs `terraform ARGS` followed by the `-var` arguments `vars`.
async fn run_with_vars(ws: &Workspace, args: &[&str], vars: &[String]) -> support::Run {
    let all: Vec<&str> = args
        .iter()
        .copied()
        .chain(vars.iter().map(String::as_str))
        .collect();
    ws.run(&all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_configured_from_variables_and_another_resources_output_plans_and_applies() {
    let demo = Demo::start(DemoOptions::fast(223))
        .await
        .expect("the demo starts");
    let east = demo.cluster("east").unwrap();
    let control = east.control.client();
    let addr = east.control.grpc_addr().to_string();
    let vars = vars(&addr, &east.ca_file, &east.admin_credential);
    let stored = || async {
        let mut names: Vec<String> = control
            .get_policies(None, None, None)
            .await
            .expect("reading the policies")
            .iter()
            .map(|p| format!("{} {}", p.kind(), p.name))
            .collect();
        names.sort();
        names
    };

    for (bin, version) in terraforms() {
        let ws = Workspace::using(bin);
        ws.write(&configuration());
        let run = ws.run(&["validate", "-no-color"]).await;
        assert_eq!(run.code, 0, "{version}: validate failed:\n{}", run.text());

        let run = run_with_vars(
            &ws,
            &["plan", "-detailed-exitcode", "-input=false", "-no-color"],
            &vars,
        )
        .await;
        assert_eq!(
            run.code,
            2,
            "{version}: the first plan should create two policies:\n{}",
            run.text()
        );
        assert!(run.stdout.contains("2 to add"), "{version}: {}", run.text());
        assert!(
            stored().await.is_empty(),
            "{version}: a plan applied something"
        );

        let run = run_with_vars(
            &ws,
            &["apply", "-auto-approve", "-input=false", "-no-color"],
            &vars,
        )
        .await;
        assert_eq!(run.code, 0, "{version}: apply failed:\n{}", run.text());
        assert_eq!(
            stored().await,
            vec!["DestinationRule details", "DestinationRule reviews"],
            "{version}: both providers applied their policy"
        );

        let run = run_with_vars(
            &ws,
            &["plan", "-detailed-exitcode", "-input=false", "-no-color"],
            &vars,
        )
        .await;
        assert_eq!(
            run.code,
            0,
            "{version}: the second plan should be empty:\n{}",
            run.text()
        );

        let run = run_with_vars(
            &ws,
            &["destroy", "-auto-approve", "-input=false", "-no-color"],
            &vars,
        )
        .await;
        assert_eq!(run.code, 0, "{version}: destroy failed:\n{}", run.text());
        assert!(
            stored().await.is_empty(),
            "{version}: destroy left policies"
        );
    }
    demo.shutdown().await;
}

/// Copies `from` into `to` recursively (files only; no `.terraform` directories).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let name = entry.file_name();
        if name == ".terraform" {
            continue;
        }
        if path.is_dir() {
            copy_tree(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}

/// The registry providers the modules use (helm, kubernetes, random, tls), as the test
/// stand-in Cargo builds beside this test (`examples/standin_provider.rs`), one copy per
/// provider name, in `dir`.
fn stand_ins(dir: &Path) -> [&'static str; 4] {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/examples/standin_provider
    let built = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("examples").join("standin_provider"))
        .unwrap();
    assert!(
        built.exists(),
        "{} is missing: `cargo test` builds it with the examples (or run `cargo build -p \
         terraform-provider-isthmus --example standin_provider`)",
        built.display()
    );
    std::fs::create_dir_all(dir).unwrap();
    let names = ["helm", "kubernetes", "random", "tls"];
    for name in names {
        std::fs::copy(&built, dir.join(format!("terraform-provider-{name}"))).unwrap();
    }
    names
}

#[tokio::test]
async fn the_three_clusters_example_validates_and_plans_with_its_module_wiring() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("terraform");
    copy_tree(&root.join("modules"), &tree.join("modules"));
    copy_tree(
        &root.join("examples/three-clusters"),
        &tree.join("examples/three-clusters"),
    );
    let example = tree.join("examples/three-clusters");
    // The operator credential the isthmus provider block reads with file().
    let ca = isthmus_core::ca::CertificateAuthority::generate("east.isthmus.local").unwrap();
    let operator = isthmus_core::identity::SpiffeId::new("east.isthmus.local", "x", "y");
    let issued = ca
        .issue(&operator, std::time::Duration::from_secs(600))
        .unwrap();
    let (cert, key) = (
        scratch.path().join("admin.pem"),
        scratch.path().join("admin-key.pem"),
    );
    std::fs::write(&cert, &issued.cert_chain_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    let plugins = scratch.path().join("plugins");
    let sources: Vec<String> = stand_ins(&plugins)
        .iter()
        .map(|name| format!("hashicorp/{name}"))
        .collect();

    for (bin, version) in terraforms() {
        let more: Vec<(&str, &Path)> = sources
            .iter()
            .map(|s| (s.as_str(), plugins.as_path()))
            .collect();
        let ws = Workspace::with_overrides(bin, &more);
        // Local modules only: `terraform get` installs them without touching a registry.
        let run = ws.run_in(&example, &["get", "-no-color"]).await;
        assert_eq!(
            run.code,
            0,
            "{version}: terraform get failed:\n{}",
            run.text()
        );
        let run = ws.run_in(&example, &["validate", "-no-color"]).await;
        assert_eq!(run.code, 0, "{version}: validate failed:\n{}", run.text());

        // The isthmus provider's ca_certificate is module.east.trust_bundle, a certificate
        // the tls provider makes at apply: unknown in this plan.
        let run = ws
            .run_in(
                &example,
                &[
                    "plan",
                    "-detailed-exitcode",
                    "-input=false",
                    "-no-color",
                    "-var",
                    &format!("operator_certificate_file={}", cert.display()),
                    "-var",
                    &format!("operator_key_file={}", key.display()),
                ],
            )
            .await;
        assert_eq!(run.code, 2, "{version}: plan failed:\n{}", run.text());
        for planned in [
            "module.federation.isthmus_cluster.member[\"west\"] will be created",
            "module.federation.isthmus_cluster.member[\"central\"] will be created",
            "module.federation.isthmus_policy.mesh[\"reviews-subsets\"] will be created",
            "module.east.helm_release.isthmus will be created",
        ] {
            assert!(
                run.stdout.contains(planned),
                "{version}: no `{planned}`:\n{}",
                run.text()
            );
        }
    }
}
