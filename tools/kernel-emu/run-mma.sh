#!/usr/bin/env bash
# Runs the tensor-core kernels (mma_f16, mma_bf16) on the emulator over every case of
# tests/kernel_emu.rs in every configuration: the device's split (SMS = 132) and one split
# (SMS = 1: the whole 3-stage cp.async pipeline), exact, and with the gradient filter at θ = 2^-12
# and θ = 0.99 (tiles really skipped: gradients change, within the documented bound).
# scripts/test runs the same test with a third of the extra configurations.
set -euo pipefail
cd "$(dirname "$0")/../.."
FUSED_INFONCE_EMU_FULL=1 cargo test --release --test kernel_emu -- --nocapture
