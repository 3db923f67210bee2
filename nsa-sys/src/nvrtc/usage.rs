//! What ptxas allocated for each kernel: registers, stack frame and spills, read from NVRTC's
//! log of a compile with `--ptxas-options=-v`. A stack frame or spills in a hot kernel mean
//! local-memory traffic in its inner loop (a by-value struct indexed at run time put 168 bytes
//! of the selection kernel on the stack once, BENCHMARKS.md round 16), so the CPU tests keep
//! the whole table as a snapshot that any change has to be accepted into.
use super::{KernelSource, Nvrtc, NvrtcError};

/// One kernel's resources as ptxas reported them for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelUsage {
    /// The kernel's (extern "C") name.
    pub kernel: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of stack frame per thread (local memory).
    pub stack_bytes: u32,
    /// Bytes of register spill stores per thread.
    pub spill_store_bytes: u32,
    /// Bytes of register spill loads per thread.
    pub spill_load_bytes: u32,
}

/// The kernels of a ptxas `-v` log, sorted by name. A kernel appears once its
/// `Compiling entry function`, its `bytes stack frame` and its `Used … registers` lines have
/// all been seen; other lines (gmem, compile times, warnings) are skipped.
pub fn parse_ptxas_verbose(log: &str) -> Vec<KernelUsage> {
    let mut out = Vec::new();
    let mut current: Option<KernelUsage> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            current = Some(KernelUsage {
                kernel: name,
                registers: 0,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            });
        } else if line.contains("bytes stack frame") {
            if let Some(k) = current.as_mut() {
                let numbers = leading_numbers(line);
                k.stack_bytes = numbers.first().copied().unwrap_or(0);
                k.spill_store_bytes = numbers.get(1).copied().unwrap_or(0);
                k.spill_load_bytes = numbers.get(2).copied().unwrap_or(0);
            }
        } else if let Some(rest) = line.split("Used ").nth(1) {
            if rest.contains("registers") {
                if let Some(mut k) = current.take() {
                    k.registers = leading_numbers(rest).first().copied().unwrap_or(0);
                    out.push(k);
                }
            }
        }
    }
    out.sort_by(|a, b| a.kernel.cmp(&b.kernel));
    out
}

/// The number before each `bytes`/`registers` word of a comma-separated ptxas line.
fn leading_numbers(text: &str) -> Vec<u32> {
    text.split(',')
        .filter_map(|part| part.split_whitespace().find_map(|w| w.parse().ok()))
        .collect()
}

impl Nvrtc {
    /// Compiles `src` for compute capability `arch` with ptxas's verbose report (no cache) and
    /// returns each kernel's registers, stack frame and spills, sorted by name. A failed
    /// compile is [`NvrtcError::Compile`], as for [`Nvrtc::compile`].
    pub fn resource_usage(
        &self,
        src: &KernelSource,
        arch: (i32, i32),
    ) -> Result<Vec<KernelUsage>, NvrtcError> {
        let mut options = self.options(src, arch);
        options.push("--ptxas-options=-v".into());
        let compiled = self.compile_with(src, arch, &options)?;
        Ok(parse_ptxas_verbose(&compiled.log))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verbose_log_gives_each_kernel_its_registers_stack_and_spills() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'nsa_b' for 'sm_90'\n\
ptxas info    : Function properties for nsa_b\n\
ptxas         .     168 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n\
ptxas info    : Used 128 registers, used 1 barriers, 168 bytes cumulative stack size\n\
ptxas info    : Compile time = 81.019 ms\n\
ptxas info    : Compiling entry function 'nsa_a' for 'sm_90'\n\
ptxas info    : Function properties for nsa_a\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 40 registers, used 0 barriers\n";
        let usage = parse_ptxas_verbose(log);
        assert_eq!(
            usage,
            vec![
                KernelUsage {
                    kernel: "nsa_a".into(),
                    registers: 40,
                    stack_bytes: 0,
                    spill_store_bytes: 0,
                    spill_load_bytes: 0,
                },
                KernelUsage {
                    kernel: "nsa_b".into(),
                    registers: 128,
                    stack_bytes: 168,
                    spill_store_bytes: 12,
                    spill_load_bytes: 20,
                },
            ]
        );
        assert!(parse_ptxas_verbose("warning: something\n").is_empty());
    }
}
