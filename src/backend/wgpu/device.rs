//! Adapter choice and device setup.
//!
//! The device is created with the adapter's own limits (not WebGPU's defaults: the storage binding
//! limit decides how large tensors are split) and with only the optional features the adapter has
//! and the user allowed: `SHADER_F16` (native f16 table reads) and `SUBGROUP` (subgroup reductions
//! in the ternary product). Every kernel has a path without each feature.
//!
//! wgpu reports most failures asynchronously. An uncaptured-error handler and a device-lost
//! callback collect them into [`Gpu::errors`]; the backend turns them into `Err`s at its next
//! submission or read ([`Gpu::check`]) instead of wgpu's default panic.
//!
//! On Linux, probing first routes libwayland-client's log to debug level where it would only
//! complain about a missing display session (see `wayland_log`).

use anyhow::{Context, Result, anyhow, bail};
use std::sync::{Arc, Mutex};

/// How to pick and configure the device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WgpuOptions {
    /// Adapter index (as listed by [`adapters`]) or a case-insensitive part of its name; `None`
    /// prefers a discrete GPU, then an integrated one, then anything else.
    pub adapter: Option<String>,
    /// Never use shader-f16 even where the adapter has it.
    pub no_f16: bool,
    /// Never use subgroup operations even where the adapter has them.
    pub no_subgroups: bool,
    /// Splits dense tables into pieces of at most this many bytes even below the device's binding
    /// limit, so tests on tiny models exercise the split that large embeddings need.
    pub table_piece_bytes: Option<u64>,
}

impl WgpuOptions {
    /// Options from `TERN_WGPU_ADAPTER`, `TERN_WGPU_NO_F16=1` and `TERN_WGPU_NO_SUBGROUPS=1`.
    pub fn from_env() -> Self {
        let flag = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
        Self {
            adapter: std::env::var("TERN_WGPU_ADAPTER")
                .ok()
                .filter(|v| !v.is_empty()),
            no_f16: flag("TERN_WGPU_NO_F16"),
            no_subgroups: flag("TERN_WGPU_NO_SUBGROUPS"),
            table_piece_bytes: None,
        }
    }
}

/// An open device and what it can do.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub f16: bool,
    pub subgroups: bool,
    /// Largest byte size of one storage binding (and of one buffer).
    pub max_binding: u64,
    /// Largest piece of a split table ([`WgpuOptions::table_piece_bytes`] or `max_binding`).
    pub table_piece: u64,
    errors: Arc<Mutex<Vec<String>>>,
}

fn instance() -> wgpu::Instance {
    #[cfg(target_os = "linux")]
    super::wayland_log::quiet_without_runtime_dir();
    // `_from_env` honors WGPU_BACKEND (e.g. `vulkan`) for users who want to restrict backends.
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Every adapter wgpu can see, in enumeration order.
pub fn adapters() -> Vec<wgpu::AdapterInfo> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(|a| a.get_info())
        .collect()
}

fn preference(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn describe_list(adapters: &[wgpu::Adapter]) -> String {
    adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let info = a.get_info();
            format!(
                "{i}: {} ({:?}, {:?})",
                info.name, info.backend, info.device_type
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn pick_adapter(mut all: Vec<wgpu::Adapter>, want: Option<&str>) -> Result<wgpu::Adapter> {
    if all.is_empty() {
        bail!(
            "no GPU adapter found (no Vulkan, Metal or DX12 driver answered; on Linux install the \
             GPU's Vulkan driver, or Mesa's lavapipe for a software GPU)"
        );
    }
    let Some(want) = want else {
        all.sort_by_key(|a| preference(a.get_info().device_type));
        return Ok(all.swap_remove(0));
    };
    let found = match want.parse::<usize>() {
        Ok(i) => (i < all.len()).then_some(i),
        Err(_) => {
            let want = want.to_lowercase();
            all.iter()
                .position(|a| a.get_info().name.to_lowercase().contains(&want))
        }
    };
    match found {
        Some(i) => Ok(all.swap_remove(i)),
        None => bail!(
            "no GPU adapter matches `{want}`; adapters: {}",
            describe_list(&all)
        ),
    }
}

impl Gpu {
    pub fn open(options: &WgpuOptions) -> Result<Self> {
        let all = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()));
        tracing::debug!("wgpu adapters: {}", describe_list(&all));
        let adapter = pick_adapter(all, options.adapter.as_deref())?;
        let info = adapter.get_info();
        tracing::debug!("wgpu adapter chosen: {} ({:?})", info.name, info.backend);
        let available = adapter.features();
        let mut features = wgpu::Features::empty();
        let f16 = !options.no_f16 && available.contains(wgpu::Features::SHADER_F16);
        if f16 {
            features |= wgpu::Features::SHADER_F16;
        }
        let subgroups = !options.no_subgroups && available.contains(wgpu::Features::SUBGROUP);
        if subgroups {
            features |= wgpu::Features::SUBGROUP;
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("tern"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .with_context(|| format!("cannot open a device on adapter `{}`", info.name))?;

        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let text = match &e {
                wgpu::Error::OutOfMemory { .. } => "out of GPU memory".to_string(),
                other => other.to_string(),
            };
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(text);
        }));
        let sink = errors.clone();
        device.set_device_lost_callback(move |reason, message| {
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("GPU device lost ({reason:?}): {message}"));
        });

        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let table_piece = options
            .table_piece_bytes
            .map_or(max_binding, |cap| cap.min(max_binding));
        Ok(Self {
            device,
            queue,
            info,
            limits,
            f16,
            subgroups,
            max_binding,
            table_piece,
            errors,
        })
    }

    /// Fails with the first device error reported since the last check, if any.
    pub fn check(&self) -> Result<()> {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.is_empty() {
            return Ok(());
        }
        let first = errors.remove(0);
        let more = errors.len();
        errors.clear();
        Err(anyhow!(
            "GPU error: {first}{}",
            if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            }
        ))
    }

    /// Runs `create` inside out-of-memory and validation error scopes, so that a failed
    /// allocation or pipeline is an `Err` naming `what` at once.
    pub fn scoped<T>(&self, what: &str, create: impl FnOnce(&wgpu::Device) -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = create(&self.device);
        let invalid = pollster::block_on(validation.pop());
        let out_of_memory = pollster::block_on(oom.pop());
        if out_of_memory.is_some() {
            bail!("out of GPU memory creating {what}");
        }
        if let Some(e) = invalid {
            bail!("GPU rejected {what}: {e}");
        }
        Ok(value)
    }
}
