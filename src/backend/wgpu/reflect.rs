//! What a kernel binds, read from its WGSL with naga (the parser wgpu itself uses), so that the
//! shaders are the one table of binding numbers and access modes: Rust binds buffers by the
//! names the WGSL gives them and never repeats a number.
//!
//! A kernel's bindings are the resource variables its entry point uses (other entry points of
//! the same file declare their own, under other numbers). One of them is the parameter block,
//! recognised by its struct type (see `params`), whose layout is checked against its Rust mirror
//! before the kernel is built; the others are data buffers.

use super::params::{Layout, Tail};
use anyhow::{Context, Result, anyhow, bail, ensure};
use wgpu::naga;

/// A struct member as both sides describe it: name, byte offset, byte size, WGSL type name.
type FieldLayout = (String, u32, u32, String);

/// The fields of a Rust mirror.
fn fields(layout: &Layout) -> Vec<FieldLayout> {
    layout
        .fields
        .iter()
        .map(|f| {
            let (offset, size) = (f.offset as u32, f.ty.size as u32);
            (f.name.into(), offset, size, f.ty.name.into())
        })
        .collect()
}

/// One resource variable an entry point uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub name: String,
    pub binding: u32,
    pub read_only: bool,
}

/// The bindings of one entry point: the parameter block and the data buffers by binding number.
#[derive(Debug)]
pub struct EntryBindings {
    pub params: Binding,
    pub data: Vec<Binding>,
}

/// A parsed and validated module (validation also records which entry point uses what).
pub struct Reflected {
    module: naga::Module,
    info: naga::valid::ModuleInfo,
}

impl Reflected {
    /// Parses and validates `source` allowing every capability: the device's own validation,
    /// with its real features, happens when wgpu builds the pipeline.
    pub fn new(source: &str) -> Result<Self> {
        let module = naga::front::wgsl::parse_str(source)
            .map_err(|e| anyhow!("WGSL does not parse: {}", e.emit_to_string(source)))?;
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .subgroup_stages(naga::valid::ShaderStages::all())
        .subgroup_operations(naga::valid::SubgroupOperationSet::all())
        .validate(&module)
        .map_err(|e| anyhow!("WGSL does not validate: {}", e.emit_to_string(source)))?;
        Ok(Self { module, info })
    }

    /// The bindings `entry` uses; the parameter block is the one of struct type `params_type`.
    pub fn bindings(&self, entry: &str, params_type: &str) -> Result<EntryBindings> {
        let index = self
            .module
            .entry_points
            .iter()
            .position(|e| e.name == entry)
            .with_context(|| format!("no entry point `{entry}`"))?;
        let used = self.info.get_entry_point(index);
        let mut params = None;
        let mut data = Vec::new();
        for (handle, var) in self.module.global_variables.iter() {
            let (Some(slot), false) = (&var.binding, used[handle].is_empty()) else {
                continue;
            };
            let naga::AddressSpace::Storage { access } = var.space else {
                bail!("`{entry}` binds something other than a storage buffer");
            };
            ensure!(slot.group == 0, "`{entry}` uses bind group {}", slot.group);
            let binding = Binding {
                name: var.name.clone().unwrap_or_default(),
                binding: slot.binding,
                read_only: !access.contains(naga::StorageAccess::STORE),
            };
            if self.module.types[var.ty].name.as_deref() == Some(params_type) {
                ensure!(params.is_none(), "`{entry}` binds two {params_type} blocks");
                params = Some(binding);
            } else {
                data.push(binding);
            }
        }
        data.sort_by_key(|b| b.binding);
        let params =
            params.with_context(|| format!("`{entry}` binds no parameter block {params_type}"))?;
        Ok(EntryBindings { params, data })
    }

    /// Checks that the WGSL struct `layout.name` (with the runtime-sized array `tail` last) has
    /// the fields of its Rust mirror: the same names, offsets, sizes and types, in order.
    pub fn check_mirror(&self, layout: &Layout, tail: Option<&Tail>) -> Result<()> {
        let (span, wgsl) = self
            .struct_layout(layout.name)
            .with_context(|| format!("the WGSL declares no struct {}", layout.name))?;
        let mut rust = fields(layout);
        let mut size = layout.size as u32;
        if let Some(tail) = tail {
            let offset = layout.size.next_multiple_of(tail.element.align) as u32;
            let ty = format!("array<{}>", tail.element.name);
            rust.push((tail.name.into(), offset, tail.element.size as u32, ty));
            // naga counts one element of a trailing runtime-sized array in the struct's size.
            size = offset + tail.element.size as u32;
            if !tail.element.fields.is_empty() {
                self.check_mirror(tail.element, None)?;
            }
        }
        ensure!(
            wgsl == rust && span == size,
            "WGSL struct {} ({span} bytes: {wgsl:?}) differs from its Rust mirror ({size} bytes: \
             {rust:?})",
            layout.name
        );
        Ok(())
    }

    /// The layout naga gives the WGSL struct `name`: its size, and each member's name, offset,
    /// size and type name (`u32`, `f32`, a struct's name, or `array<ELEMENT>` for a runtime-sized
    /// array, whose size is its stride).
    fn struct_layout(&self, name: &str) -> Option<(u32, Vec<FieldLayout>)> {
        let ctx = self.module.to_ctx();
        let (_, ty) = self
            .module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(name))?;
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            return None;
        };
        let type_name = |handle: naga::Handle<naga::Type>| -> String {
            let t = &self.module.types[handle];
            match (&t.name, &t.inner) {
                (Some(n), _) => n.clone(),
                (None, naga::TypeInner::Scalar(s)) => match *s {
                    naga::Scalar::U32 => "u32".into(),
                    naga::Scalar::I32 => "i32".into(),
                    naga::Scalar::F32 => "f32".into(),
                    other => format!("{other:?}"),
                },
                (None, other) => format!("{other:?}"),
            }
        };
        let fields = members
            .iter()
            .map(|m| {
                let inner = &self.module.types[m.ty].inner;
                let (size, ty) = match *inner {
                    naga::TypeInner::Array {
                        base,
                        size: naga::ArraySize::Dynamic,
                        stride,
                    } => (stride, format!("array<{}>", type_name(base))),
                    _ => (inner.size(ctx), type_name(m.ty)),
                };
                (m.name.clone().unwrap_or_default(), m.offset, size, ty)
            })
            .collect();
        Some((*span, fields))
    }

    /// The type names of the structs the module binds (parameter blocks).
    #[cfg(test)]
    pub fn bound_struct_types(&self) -> Vec<String> {
        self.module
            .global_variables
            .iter()
            .filter(|(_, v)| v.binding.is_some())
            .filter_map(|(_, v)| {
                let t = &self.module.types[v.ty];
                matches!(t.inner, naga::TypeInner::Struct { .. })
                    .then(|| t.name.clone())
                    .flatten()
            })
            .collect()
    }
}
