/**
 * The catalogue of every trace event tsvmm knows, in a fixed order.
 *
 * Like QEMU's trace-events files, the list is static on purpose: each event's
 * on/off state lives at its index in a SharedArrayBuffer that every thread
 * (main, vCPU workers, migration worker) shares, so QMP's
 * `trace-event-set-state` on the main thread takes effect on all threads at
 * once, and `trace-event-get-state` can list events whose code was never
 * loaded on the main thread. To add an event, append its name here (never
 * reorder: indices are shared between threads built from the same source).
 * The comment after each name gives the fields it is emitted with.
 */
export const TRACE_EVENT_NAMES = [
  // system/runstate.ts
  'runstate_set', // from= to=
  // system/notifiers.ts
  'vm_state_notify', // running= state=
  // system/cpus.ts
  'vm_start', //
  'vm_stop', // state=
  'vm_reset', // guest= reason=
  'pause_all_vcpus', // count=
  'resume_all_vcpus', // count=
  // system/main-loop.ts
  'bh_schedule', // name=
  'bh_run', // name=
  'main_loop_shutdown_request', // guest= reason=
  'main_loop_reset_request', // guest= reason=
  'main_loop_vmstop_request', // state=
  // hw/i386/kvm/clock.ts
  'kvmclock_vm_state_change', // running= state=
  'kvmclock_ctrl', // cpu= ret=
  'kvmclock_get_clock', // clock= flags= reliable=
  'kvmclock_set_clock', // clock=
  'kvmclock_pvclock_read', // ns=
  // accel/kvm (vCPU threads and ioctls; owned by the KVM layer and the lead)
  'kvm_vm_ioctl', // type= ret=
  'kvm_vcpu_ioctl', // cpu= type= ret=
  'kvm_run_exit', // cpu= reason=
  'kvm_vcpu_kick', // cpu=
  'run_on_cpu', // cpu= op=
  'async_run_on_cpu', // cpu= op=
  'process_queued_cpu_work', // cpu= op=
  // migration
  'migration_thread', // phase=
  'migration_completion', // state=
  'process_incoming_migration', // phase=
  'vmstate_save', // name= version=
  'vmstate_load', // name= version=
  // monitor
  'monitor_qmp_cmd_in_band', // id= name=
  'monitor_qmp_event', // name=
  // migration/machine-migration.ts
  'migrate_set_state', // new_state=
  // hw/i386/kvm/clock.ts, clock-check.ts (tsvmm's kvmclock policy and sanitizer)
  'kvmclock_realtime', // clock= realtime= now= advance= error= source= mode=
  'kvmclock_reading', // transition= cpu= ns= tsc= version= flags=
  'kvmclock_violation', // kind= transition= cpu=
  // accel/kvm/vcpu-thread.ts: how long each KVM_RUN took, and the time out of it before
  'kvm_run_timing', // cpu= reason= run_us= out_us=
  // migration/kvm-dirty-log.ts: each dirty-log ioctl (start/stop: the slot's re-registration)
  'dirty_log_ioctl', // op= slot= pages= dirty= us=
] as const;

/** The name of one known trace event. */
export type TraceEventName = (typeof TRACE_EVENT_NAMES)[number];
