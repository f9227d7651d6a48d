import type { QmpListenSpec } from '../monitor/qmp-server.js';
import { onlyProps, parseQemuBool, parseQemuOpts } from './qemu-opts.js';
import { UsageError } from './usage-error.js';

/**
 * Parses a `-qmp` value in QEMU's character-device spelling:
 * `unix:PATH,server=on,wait=off` or `tcp:[HOST]:PORT,server=on,wait=off`
 * (IPv6 hosts in brackets; the old `server` and `nowait` flags are accepted
 * too). As in QEMU, `wait` defaults to on for a server: the VM does not
 * start until a client connects. tsvmm only listens, so server=on is required.
 */
export function parseQmpSpec(value: string): QmpListenSpec {
  const opts = parseQemuOpts('-qmp', value, 'address');
  const address = opts.implied ?? '';
  if (!address.startsWith('unix:') && !address.startsWith('tcp:')) {
    throw new UsageError(
      `-qmp ${value}: unsupported character device '${address}'; use unix:PATH or tcp:HOST:PORT with server=on`,
    );
  }
  onlyProps('-qmp', opts, ['server', 'wait', 'nowait', 'nodelay']);
  const server = opts.props.has('server')
    ? parseQemuBool('-qmp', 'server', opts.props.get('server')!)
    : false;
  if (!server) {
    throw new UsageError(
      `-qmp ${value}: tsvmm only listens for QMP clients; add server=on (for example -qmp unix:/tmp/qmp.sock,server=on,wait=off)`,
    );
  }
  let wait = true;
  if (opts.props.has('wait')) wait = parseQemuBool('-qmp', 'wait', opts.props.get('wait')!);
  if (opts.props.has('nowait')) wait = !parseQemuBool('-qmp', 'nowait', opts.props.get('nowait')!);

  if (address.startsWith('unix:')) {
    const path = address.slice('unix:'.length);
    if (path === '') throw new UsageError(`-qmp ${value}: the unix socket path is empty`);
    return { kind: 'unix', path, wait };
  }
  {
    const rest = address.slice('tcp:'.length);
    const match = /^(\[[^\]]*\]|[^:]*):(\d+)$/.exec(rest);
    if (match === null) {
      throw new UsageError(`-qmp ${value}: expected tcp:HOST:PORT, for example tcp:127.0.0.1:4444`);
    }
    const host = match[1]!.replace(/^\[(.*)\]$/, '$1');
    const port = Number(match[2]);
    if (port > 65535) throw new UsageError(`-qmp ${value}: port ${port} is out of range (0-65535)`);
    return { kind: 'tcp', host, port, wait };
  }
}
