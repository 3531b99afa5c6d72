//! Schemas as this provider declares them, and their translation to the protocol's.
//!
//! A [`Block`] is a resource's (or data source's, or the provider's) top-level object: its
//! attributes and nested blocks. [`Block::ty`] is the cty object type Terraform encodes the
//! values of that block with, which the codec needs to read and write them.

use crate::cty::Type;
use crate::proto::tfplugin6 as pb;

/// How an attribute is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Required,
    Optional,
    /// Set by the provider only.
    Computed,
    /// Set by the user, or by the provider when the user does not.
    OptionalComputed,
}

/// One attribute.
#[derive(Debug, Clone)]
pub struct Attr {
    pub name: &'static str,
    pub ty: Type,
    pub mode: Mode,
    pub sensitive: bool,
    pub description: &'static str,
}

impl Attr {
    fn new(name: &'static str, ty: Type, mode: Mode, description: &'static str) -> Attr {
        Attr {
            name,
            ty,
            mode,
            sensitive: false,
            description,
        }
    }

    pub fn required(name: &'static str, ty: Type, description: &'static str) -> Attr {
        Attr::new(name, ty, Mode::Required, description)
    }

    pub fn optional(name: &'static str, ty: Type, description: &'static str) -> Attr {
        Attr::new(name, ty, Mode::Optional, description)
    }

    pub fn computed(name: &'static str, ty: Type, description: &'static str) -> Attr {
        Attr::new(name, ty, Mode::Computed, description)
    }

    pub fn optional_computed(name: &'static str, ty: Type, description: &'static str) -> Attr {
        Attr::new(name, ty, Mode::OptionalComputed, description)
    }

    pub fn sensitive(mut self) -> Attr {
        self.sensitive = true;
        self
    }

    fn to_proto(&self) -> pb::SchemaAttribute {
        pb::SchemaAttribute {
            name: self.name.to_string(),
            r#type: self.ty.to_json().to_string().into_bytes(),
            description: self.description.to_string(),
            required: self.mode == Mode::Required,
            optional: matches!(self.mode, Mode::Optional | Mode::OptionalComputed),
            computed: matches!(self.mode, Mode::Computed | Mode::OptionalComputed),
            sensitive: self.sensitive,
            description_kind: pb::StringKind::Plain as i32,
            deprecated: false,
        }
    }
}

/// A repeated nested block (`priority { ... }`), kept in order.
#[derive(Debug, Clone)]
pub struct NestedBlock {
    pub name: &'static str,
    pub block: Block,
    pub min_items: i64,
    pub max_items: i64,
}

/// A block: attributes and nested blocks.
#[derive(Debug, Clone, Default)]
pub struct Block {
    pub attrs: Vec<Attr>,
    pub blocks: Vec<NestedBlock>,
    pub description: &'static str,
}

impl Block {
    pub fn new(description: &'static str, attrs: Vec<Attr>) -> Block {
        Block {
            attrs,
            blocks: Vec::new(),
            description,
        }
    }

    pub fn with_list_block(mut self, name: &'static str, block: Block) -> Block {
        self.blocks.push(NestedBlock {
            name,
            block,
            min_items: 0,
            max_items: 0,
        });
        self
    }

    /// The object type of this block's values.
    pub fn ty(&self) -> Type {
        Type::object(
            self.attrs.iter().map(|a| (a.name, a.ty.clone())).chain(
                self.blocks
                    .iter()
                    .map(|b| (b.name, Type::list(b.block.ty()))),
            ),
        )
    }

    /// The attribute named `name`, if any.
    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|a| a.name == name)
    }

    pub fn to_proto(&self) -> pb::SchemaBlock {
        pb::SchemaBlock {
            version: 0,
            attributes: self.attrs.iter().map(Attr::to_proto).collect(),
            block_types: self
                .blocks
                .iter()
                .map(|b| pb::SchemaNestedBlock {
                    type_name: b.name.to_string(),
                    block: Some(b.block.to_proto()),
                    nesting: pb::schema_nested_block::Nesting::List as i32,
                    min_items: b.min_items,
                    max_items: b.max_items,
                })
                .collect(),
            description: self.description.to_string(),
            description_kind: pb::StringKind::Plain as i32,
            deprecated: false,
        }
    }

    /// The protocol's schema (version 0) for this block.
    pub fn schema(&self) -> pb::Schema {
        pb::Schema {
            version: 0,
            block: Some(self.to_proto()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_blocks_are_lists_of_objects_in_the_blocks_type() {
        let block = Block::new("r", vec![Attr::required("name", Type::String, "n")])
            .with_list_block(
                "priority",
                Block::new(
                    "p",
                    vec![Attr::optional("clusters", Type::list(Type::String), "c")],
                ),
            );
        assert_eq!(
            block.ty().to_json().to_string(),
            r#"["object",{"name":"string","priority":["list",["object",{"clusters":["list","string"]}]]}]"#
        );
        let proto = block.to_proto();
        assert!(proto.attributes[0].required);
        assert_eq!(proto.block_types[0].type_name, "priority");
    }
}
