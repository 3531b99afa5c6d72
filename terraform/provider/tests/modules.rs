//! The modules and examples under terraform/, checked without the helm and kubernetes
//! providers (which cannot be installed here):
//!
//! - by parsing (hcl-rs): every `var.` used is declared, every `local.`, `data.` and resource
//!   reference resolves, every module input exists in the module and every required one is
//!   given, every `module.M.O` names an output of M, and every output has a value;
//! - `terraform fmt -check -recursive` finds nothing to change;
//! - `terraform validate` of the isthmus-federation module, which needs only this provider.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hcl::{Body, Expression, ObjectKey, TraversalOperator};
use support::Workspace;

mod support;

/// What one directory of .tf files declares and references.
#[derive(Default, Debug)]
struct Module {
    /// Variable name → whether it has a default.
    variables: BTreeMap<String, bool>,
    locals: BTreeSet<String>,
    outputs: BTreeSet<String>,
    outputs_without_value: BTreeSet<String>,
    resources: BTreeSet<String>,
    data: BTreeSet<String>,
    /// Module name → (source, arguments given).
    calls: BTreeMap<String, (String, BTreeSet<String>)>,
    /// Names bound by for expressions and dynamic blocks.
    iterators: BTreeSet<String>,
    /// Every reference, as its root and the attribute names that follow it.
    refs: Vec<(String, Vec<String>)>,
    /// Aliased provider configurations declared (`helm.east`).
    providers: BTreeSet<String>,
    /// Provider configurations passed to modules.
    provider_refs: BTreeSet<String>,
}

const META_ARGS: &[&str] = &[
    "source",
    "version",
    "providers",
    "depends_on",
    "count",
    "for_each",
];

fn terraform_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("terraform/provider has a parent")
        .to_path_buf()
}

fn walk_expr(e: &Expression, m: &mut Module) {
    match e {
        Expression::Array(items) => items.iter().for_each(|i| walk_expr(i, m)),
        Expression::Object(obj) => {
            for (k, v) in obj {
                if let ObjectKey::Expression(k) = k {
                    walk_expr(k, m);
                }
                walk_expr(v, m);
            }
        }
        Expression::TemplateExpr(t) => {
            let template = hcl::Template::from_expr(t).expect("a template that parses");
            walk_template(&template, m);
        }
        Expression::Variable(v) => m.refs.push((v.as_str().to_string(), Vec::new())),
        Expression::Traversal(t) => {
            let mut attrs = Vec::new();
            for op in &t.operators {
                match op {
                    TraversalOperator::GetAttr(a) => attrs.push(a.as_str().to_string()),
                    TraversalOperator::Index(i) => {
                        walk_expr(i, m);
                        // An index ends the plain attribute path (module.m[0].x is not checked).
                        break;
                    }
                    _ => break,
                }
            }
            for op in &t.operators {
                if let TraversalOperator::Index(i) = op {
                    walk_expr(i, m);
                }
            }
            match &t.expr {
                Expression::Variable(v) => m.refs.push((v.as_str().to_string(), attrs)),
                other => walk_expr(other, m),
            }
        }
        Expression::FuncCall(f) => f.args.iter().for_each(|a| walk_expr(a, m)),
        Expression::Parenthesis(p) => walk_expr(p, m),
        Expression::Conditional(c) => {
            walk_expr(&c.cond_expr, m);
            walk_expr(&c.true_expr, m);
            walk_expr(&c.false_expr, m);
        }
        Expression::Operation(op) => match op.as_ref() {
            hcl::expr::Operation::Unary(u) => walk_expr(&u.expr, m),
            hcl::expr::Operation::Binary(b) => {
                walk_expr(&b.lhs_expr, m);
                walk_expr(&b.rhs_expr, m);
            }
        },
        Expression::ForExpr(f) => {
            if let Some(k) = &f.key_var {
                m.iterators.insert(k.as_str().to_string());
            }
            m.iterators.insert(f.value_var.as_str().to_string());
            walk_expr(&f.collection_expr, m);
            if let Some(k) = &f.key_expr {
                walk_expr(k, m);
            }
            walk_expr(&f.value_expr, m);
            if let Some(c) = &f.cond_expr {
                walk_expr(c, m);
            }
        }
        _ => {}
    }
}

fn walk_template(t: &hcl::Template, m: &mut Module) {
    use hcl::template::{Directive, Element};
    for el in t.elements() {
        match el {
            Element::Literal(_) => {}
            Element::Interpolation(i) => walk_expr(&i.expr, m),
            Element::Directive(d) => match d.as_ref() {
                Directive::If(i) => {
                    walk_expr(&i.cond_expr, m);
                    walk_template(&i.true_template, m);
                    if let Some(f) = &i.false_template {
                        walk_template(f, m);
                    }
                }
                Directive::For(f) => {
                    if let Some(k) = &f.key_var {
                        m.iterators.insert(k.as_str().to_string());
                    }
                    m.iterators.insert(f.value_var.as_str().to_string());
                    walk_expr(&f.collection_expr, m);
                    walk_template(&f.template, m);
                }
            },
        }
    }
}

fn walk_body(body: &Body, m: &mut Module) {
    for a in body.attributes() {
        walk_expr(&a.expr, m);
    }
    for b in body.blocks() {
        if b.identifier.as_str() == "dynamic" {
            if let Some(label) = b.labels.first() {
                m.iterators.insert(label.as_str().to_string());
            }
        }
        walk_body(&b.body, m);
    }
}

/// Parses every .tf file of `dir`.
fn load(dir: &Path) -> Module {
    let mut m = Module::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tf"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let body = hcl::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for block in body.blocks() {
            let labels: Vec<&str> = block.labels.iter().map(|l| l.as_str()).collect();
            match (block.identifier.as_str(), labels.as_slice()) {
                ("variable", [name]) => {
                    let has_default = block.body.attributes().any(|a| a.key.as_str() == "default");
                    m.variables.insert(name.to_string(), has_default);
                }
                ("locals", []) => {
                    for a in block.body.attributes() {
                        m.locals.insert(a.key.as_str().to_string());
                    }
                }
                ("output", [name]) => {
                    m.outputs.insert(name.to_string());
                    if !block.body.attributes().any(|a| a.key.as_str() == "value") {
                        m.outputs_without_value.insert(name.to_string());
                    }
                }
                ("resource", [ty, name]) => {
                    m.resources.insert(format!("{ty}.{name}"));
                }
                ("data", [ty, name]) => {
                    m.data.insert(format!("{ty}.{name}"));
                }
                ("module", [name]) => {
                    let source = block
                        .body
                        .attributes()
                        .find(|a| a.key.as_str() == "source")
                        .and_then(|a| match &a.expr {
                            Expression::String(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    let args = block
                        .body
                        .attributes()
                        .map(|a| a.key.as_str().to_string())
                        .filter(|k| !META_ARGS.contains(&k.as_str()))
                        .collect();
                    m.calls.insert(name.to_string(), (source, args));
                }
                _ => {}
            }
            match block.identifier.as_str() {
                // A variable's type is not an expression of references.
                "variable" => {
                    for a in block
                        .body
                        .attributes()
                        .filter(|a| a.key.as_str() == "default")
                    {
                        walk_expr(&a.expr, &mut m);
                    }
                }
                "provider" => {
                    let alias = block.body.attributes().find(|a| a.key.as_str() == "alias");
                    if let (Some(Expression::String(alias)), [ty]) =
                        (alias.map(|a| &a.expr), labels.as_slice())
                    {
                        m.providers.insert(format!("{ty}.{alias}"));
                    }
                    walk_body(&block.body, &mut m);
                }
                "module" => {
                    for a in block.body.attributes() {
                        if a.key.as_str() != "providers" {
                            walk_expr(&a.expr, &mut m);
                            continue;
                        }
                        if let Expression::Object(map) = &a.expr {
                            for v in map.values() {
                                let mut refs = Module::default();
                                walk_expr(v, &mut refs);
                                for (root, attrs) in refs.refs {
                                    m.provider_refs.insert(
                                        std::iter::once(root)
                                            .chain(attrs)
                                            .collect::<Vec<_>>()
                                            .join("."),
                                    );
                                }
                            }
                        }
                    }
                    for b in block.body.blocks() {
                        walk_body(&b.body, &mut m);
                    }
                }
                _ => walk_body(&block.body, &mut m),
            }
        }
    }
    m
}

/// Every problem with the references of the module in `dir`.
fn problems(dir: &Path) -> Vec<String> {
    let m = load(dir);
    let mut out = Vec::new();
    let name = dir.display();
    for o in &m.outputs_without_value {
        out.push(format!("{name}: output {o} has no value"));
    }
    let mut called: BTreeMap<String, Module> = BTreeMap::new();
    for (call, (source, args)) in &m.calls {
        if !source.starts_with("./") && !source.starts_with("../") {
            out.push(format!(
                "{name}: module {call}: source {source:?} is not a local path"
            ));
            continue;
        }
        let child = load(&dir.join(source));
        for a in args {
            if !child.variables.contains_key(a) {
                out.push(format!(
                    "{name}: module {call} sets {a}, which {source} does not declare"
                ));
            }
        }
        for (v, has_default) in &child.variables {
            if !has_default && !args.contains(v) {
                out.push(format!(
                    "{name}: module {call} does not set the required variable {v}"
                ));
            }
        }
        called.insert(call.clone(), child);
    }
    for p in &m.provider_refs {
        if p.contains('.') && !m.providers.contains(p) {
            out.push(format!(
                "{name}: provider configuration {p} is not declared"
            ));
        }
    }
    for (root, attrs) in &m.refs {
        let first = attrs.first().map(String::as_str);
        let problem = match (root.as_str(), first) {
            ("var", Some(v)) if !m.variables.contains_key(v) => {
                Some(format!("var.{v} is not declared"))
            }
            ("local", Some(l)) if !m.locals.contains(l) => {
                Some(format!("local.{l} is not declared"))
            }
            ("module", Some(call)) => match called.get(call) {
                None => Some(format!("module.{call} is not declared")),
                Some(child) => match attrs.get(1) {
                    Some(o) if !child.outputs.contains(o) => {
                        Some(format!("module.{call}.{o}: the module has no output {o}"))
                    }
                    _ => None,
                },
            },
            ("data", Some(ty)) => match attrs.get(1) {
                Some(n) if !m.data.contains(&format!("{ty}.{n}")) => {
                    Some(format!("data.{ty}.{n} is not declared"))
                }
                _ => None,
            },
            (
                "var" | "local" | "module" | "data" | "path" | "terraform" | "count" | "each"
                | "self",
                _,
            ) => None,
            (r, _) if m.iterators.contains(r) => None,
            (ty, Some(n)) if !m.resources.contains(&format!("{ty}.{n}")) => {
                Some(format!("{ty}.{n} is not a declared resource"))
            }
            (ty, None) => Some(format!("{ty} is neither declared nor a loop variable")),
            _ => None,
        };
        if let Some(p) = problem {
            out.push(format!("{name}: {p}"));
        }
    }
    out
}

fn module_dirs() -> Vec<PathBuf> {
    let root = terraform_dir();
    let mut dirs = Vec::new();
    for group in ["modules", "examples"] {
        for entry in
            std::fs::read_dir(root.join(group)).expect("terraform/ has modules and examples")
        {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            }
        }
    }
    dirs.sort();
    dirs
}

#[test]
fn every_variable_module_input_and_output_of_the_modules_and_examples_resolves() {
    let dirs = module_dirs();
    let names: Vec<String> = dirs
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for expected in ["isthmus-cluster", "isthmus-federation", "three-clusters"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} is missing: {names:?}"
        );
    }
    let all: Vec<String> = dirs.iter().flat_map(|d| problems(d)).collect();
    assert!(all.is_empty(), "unresolved references:\n{}", all.join("\n"));
}

#[test]
fn the_reference_check_catches_undeclared_names() {
    let dir = tempfile::tempdir().unwrap();
    let child = dir.path().join("child");
    std::fs::create_dir(&child).unwrap();
    std::fs::write(
        child.join("main.tf"),
        "variable \"needed\" {}\noutput \"out\" { value = var.needed }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("main.tf"),
        r#"
locals { ok = [for x in var.list : x.name] }
resource "null_resource" "a" {}
provider "random" { alias = "one" }
module "c" {
  source    = "./child"
  typo      = "x"
  providers = { random = random.two }
}
output "a" { value = "${var.missing}-${local.nope}-${module.c.nothing}-${null_resource.b.id}" }
output "b" { value = [null_resource.a.id, local.ok, module.c.out] }
output "c" { description = "no value" }
variable "list" { default = [] }
"#,
    )
    .unwrap();
    let found = problems(dir.path()).join("\n");
    for expected in [
        "output c has no value",
        "module c sets typo",
        "does not set the required variable needed",
        "var.missing is not declared",
        "local.nope is not declared",
        "module.c.nothing",
        "null_resource.b is not a declared resource",
        "provider configuration random.two is not declared",
    ] {
        assert!(
            found.contains(expected),
            "{expected:?} not reported in:\n{found}"
        );
    }
    assert_eq!(found.lines().count(), 8, "{found}");
}

#[tokio::test]
async fn terraform_fmt_finds_nothing_to_change_under_terraform() {
    let ws = Workspace::new();
    let root = terraform_dir();
    let run = ws
        .run(&[
            "fmt",
            "-check",
            "-recursive",
            "-diff",
            "-no-color",
            &root.display().to_string(),
        ])
        .await;
    assert_eq!(run.code, 0, "terraform fmt would change:\n{}", run.text());
}

#[tokio::test]
async fn the_federation_module_validates_against_the_provider_schema() {
    let ws = Workspace::new();
    let module = terraform_dir().join("modules/isthmus-federation");
    for entry in std::fs::read_dir(&module).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "tf") {
            std::fs::copy(&path, ws.dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let run = ws.run(&["validate", "-no-color"]).await;
    assert_eq!(run.code, 0, "terraform validate failed:\n{}", run.text());
    assert!(
        run.stdout.contains("The configuration is valid"),
        "{}",
        run.text()
    );
}
