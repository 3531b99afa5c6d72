//! `isthmus context list|use`: the operator's contexts (`isthmus_core::contexts`).

use anyhow::bail;
use isthmus_core::contexts::{config_path, Contexts};

fn path() -> anyhow::Result<std::path::PathBuf> {
    Ok(config_path(&|name| std::env::var(name).ok())?)
}

/// `isthmus context list`.
pub fn list() -> anyhow::Result<()> {
    let path = path()?;
    let all = Contexts::load(&path)?;
    if all.contexts.is_empty() {
        println!(
            "no contexts in {} (isthmus demo writes some)",
            path.display()
        );
        return Ok(());
    }
    for (name, c) in &all.contexts {
        let mark = if all.current_context.as_deref() == Some(name) {
            "*"
        } else {
            " "
        };
        println!(
            "{mark} {name:<16} {:<24} {}",
            c.control,
            c.ca_file.display()
        );
    }
    Ok(())
}

/// `isthmus context use NAME`.
pub fn use_context(name: &str) -> anyhow::Result<()> {
    let path = path()?;
    let mut all = Contexts::load(&path)?;
    if !all.contexts.contains_key(name) {
        bail!(
            "{}: no context named {name:?} (isthmus context list)",
            path.display()
        );
    }
    all.current_context = Some(name.to_string());
    all.save(&path)?;
    println!("using context {name}");
    Ok(())
}
