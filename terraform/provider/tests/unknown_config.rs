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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_configured_from_variables_and_another_resources_output_plans_and_applies() {
    let demo = Demo::start(DemoOptions::fast(223))
        .await
        .expect("the demo starts");
    let east = demo.cluster("east").unwrap();
    let control = east.control.client();
    let addr = east.control.grpc_addr().to_string();
    let vars = vars(&addr, &east.ca_file, &east.admin_credential);
    let with_vars = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|a| a.to_string())
            .chain(vars.iter().cloned())
            .collect()
    };
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

        let args = with_vars(&["plan", "-detailed-exitcode", "-input=false", "-no-color"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = ws.run(&args).await;
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

        let args = with_vars(&["apply", "-auto-approve", "-input=false", "-no-color"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = ws.run(&args).await;
        assert_eq!(run.code, 0, "{version}: apply failed:\n{}", run.text());
        assert_eq!(
            stored().await,
            vec!["DestinationRule details", "DestinationRule reviews"],
            "{version}: both providers applied their policy"
        );

        let args = with_vars(&["plan", "-detailed-exitcode", "-input=false", "-no-color"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = ws.run(&args).await;
        assert_eq!(
            run.code,
            0,
            "{version}: the second plan should be empty:\n{}",
            run.text()
        );

        let args = with_vars(&["destroy", "-auto-approve", "-input=false", "-no-color"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = ws.run(&args).await;
        assert_eq!(run.code, 0, "{version}: destroy failed:\n{}", run.text());
        assert!(
            stored().await.is_empty(),
            "{version}: destroy left policies"
        );
    }
    demo.shutdown().await;
}
