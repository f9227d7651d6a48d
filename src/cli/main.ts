#!/usr/bin/env node
/**
 * tsvmm's entry point. It starts the vCPU threads first, then loads the
 * rest of tsvmm (tsvmm.ts): each worker's own start (a V8 isolate, Node's
 * bootstrap, its code and koffi) then runs beside the main thread's
 * loading and KVM set-up instead of after it (accel/kvm/vcpu-prestart.ts).
 * So this module imports nothing else at load time.
 */
import { prestartVcpuWorkers, vcpuCountHint } from '../accel/kvm/vcpu-prestart.js';

const argv = process.argv.slice(2);
prestartVcpuWorkers(vcpuCountHint(argv));
const { runTsvmm } = await import('./tsvmm.js');
await runTsvmm(argv);
