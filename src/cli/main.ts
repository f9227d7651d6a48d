#!/usr/bin/env node
/**
 * tsvmm's entry point (bundled as dist/cli/main.cjs: scripts/bundle.mjs).
 * It starts the vCPU threads first, then loads the rest of tsvmm
 * (tsvmm.ts, bundled as tsvmm.cjs): each worker's own start (a V8
 * isolate, Node's own bootstrap, its code and koffi) then runs beside the
 * main thread's loading and KVM set-up instead of after it
 * (accel/kvm/vcpu-prestart.ts). So this module imports nothing else.
 */
import { createRequire } from 'node:module';
import { prestartVcpuWorkers, vcpuCountHint } from '../accel/kvm/vcpu-prestart.js';

const argv = process.argv.slice(2);
prestartVcpuWorkers(vcpuCountHint(argv));
const { runTsvmm } = createRequire(import.meta.url)('./tsvmm.cjs') as typeof import('./tsvmm.js');
// runTsvmm reports its own failures and ends the process.
void runTsvmm(argv);
