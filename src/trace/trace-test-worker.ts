import { parentPort, workerData } from 'node:worker_threads';
import { installTraceConfig, type TraceConfig, traceEvent } from './control.js';

/**
 * A worker for control.test.ts: it installs the trace set-up it was given,
 * as a vCPU thread does, emits on command and reports back.
 */
const data = workerData as { config: TraceConfig; name: string };
installTraceConfig(data.config, data.name);
const ctrl = traceEvent('kvmclock_ctrl');
parentPort!.on('message', (msg: { emit: number } | 'exit') => {
  if (msg === 'exit') {
    parentPort!.close();
    return;
  }
  ctrl.emit({ cpu: 0, ret: msg.emit });
  parentPort!.postMessage('emitted');
});
parentPort!.postMessage('ready');
