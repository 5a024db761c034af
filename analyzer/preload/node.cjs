'use strict';
// redirect-audit's preload for Node.js (`NODE_OPTIONS=--require .../node.cjs`, set by
// `redirect-audit run`): Node's own HTTP clients send through the recorder, whatever the
// Node version. Node before 22.21 reads no proxy variable at all, so without this its
// fetch and its http/https modules go straight to the server and nothing is recorded.
//
// * fetch (undici, built in): the global dispatcher becomes an undici Agent, of the
//   class Node ships, whose connector opens a CONNECT tunnel through the recorder;
// * http and https: their global agents become agents whose connections are such
//   tunnels (keep-alive as Node's own; TLS inside the tunnel, checked against Node's
//   CAs plus NODE_EXTRA_CA_CERTS, which has the recorder's CA).
//
// A tunnel's CONNECT carries the client label as `Proxy-Authorization`, addressed to the
// recorder and never forwarded. Hosts in NO_PROXY (as `run` left it) go direct. Nothing
// here writes outside the directory `run` named; a process that loaded this leaves one
// line of JSON there when it exits (its runtime and how many tunnels it opened), so that
// `run` can say which runtimes started and which sent nothing.
const net = require('node:net');
const tls = require('node:tls');
const http = require('node:http');
const https = require('node:https');
const fs = require('node:fs');
const path = require('node:path');

const given = process.env.REDIRECT_AUDIT_NODE_RECORDER;
let tunnels = 0; // connections through the recorder (tunnels, and a client's own proxying)

function parseProxy(text) {
  const url = new URL(text);
  const auth = url.username
    ? 'Basic ' + Buffer.from(`${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`).toString('base64')
    : null;
  return { host: url.hostname.replace(/^\[|\]$/g, ''), port: Number(url.port || 80), auth };
}

function bypassed(proxy, host, port) {
  // a client that proxies by itself (axios reads HTTP_PROXY) connects to the recorder: direct
  if (Number(port) === proxy.port && host.replace(/^\[|\]$/g, '') === proxy.host) {
    tunnels += 1; // through the recorder all the same
    return true;
  }
  const list = (process.env.NO_PROXY || process.env.no_proxy || '').split(',').map((e) => e.trim().toLowerCase());
  const name = host.toLowerCase().replace(/^\[|\]$/g, '');
  return list.some((entry) => {
    if (!entry) return false;
    if (entry === '*') return true;
    const bare = entry.replace(/:\d+$/, '').replace(/^\*?\./, '');
    return name === bare || name.endsWith('.' + bare);
  });
}

// A socket to host:port through the recorder: callback(error, socket) once the recorder
// answered the CONNECT. The socket carries plain bytes; TLS, if any, is the caller's.
function tunnel(proxy, host, port, callback) {
  const socket = net.connect(proxy.port, proxy.host);
  let answer = Buffer.alloc(0);
  let done = false;
  const finish = (error) => {
    if (done) return;
    done = true;
    socket.removeListener('data', onData);
    if (error) {
      socket.destroy();
      callback(error);
    } else {
      tunnels += 1;
      callback(null, socket);
    }
  };
  const onData = (chunk) => {
    answer = Buffer.concat([answer, chunk]);
    const end = answer.indexOf('\r\n\r\n');
    if (end < 0) {
      if (answer.length > 65536) finish(new Error('redirect-audit: the recorder sent no end of headers'));
      return;
    }
    const status = Number(answer.subarray(0, end).toString('latin1').split(' ')[1]);
    if (status !== 200) {
      finish(new Error(`redirect-audit: the recorder answered ${status} to CONNECT ${host}:${port}`));
      return;
    }
    if (answer.length > end + 4) socket.unshift(answer.subarray(end + 4));
    finish(null);
  };
  socket.on('data', onData);
  socket.once('error', (error) => finish(error));
  socket.once('close', () => finish(new Error('redirect-audit: the recorder closed the tunnel')));
  socket.once('connect', () => {
    const target = net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
    const auth = proxy.auth ? `Proxy-Authorization: ${proxy.auth}\r\n` : '';
    socket.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n${auth}\r\n`);
  });
}

function overTls(socket, options, callback) {
  const servername = options.servername || (net.isIP(options.host) ? undefined : options.host);
  const secure = tls.connect({ ...options, socket, servername, host: undefined, port: undefined });
  let called = false;
  const once = (error, value) => {
    if (!called) {
      called = true;
      callback(error, value);
    }
  };
  secure.once('secureConnect', () => once(null, secure));
  secure.once('error', (error) => once(error));
  return secure;
}

function install(proxy) {
  // fetch: undici's Agent, of the class Node ships (the global dispatcher made on first use)
  const key = Symbol.for('undici.globalDispatcher.1');
  if (typeof globalThis.fetch === 'function') {
    if (globalThis[key] === undefined) {
      // Node loads its undici on the first fetch, which then makes the global dispatcher:
      // a data: URL loads it without any traffic
      globalThis.fetch('data:,').then((r) => r.arrayBuffer(), () => undefined).catch(() => undefined);
    }
    const Agent = globalThis[key] && globalThis[key].constructor;
    if (Agent && Agent.name === 'Agent') {
      const dispatcher = new Agent({
        connect(opts, callback) {
          const host = opts.hostname;
          const port = Number(opts.port || (opts.protocol === 'https:' ? 443 : 80));
          if (bypassed(proxy, host, port)) {
            const direct = opts.protocol === 'https:'
              ? tls.connect({ host, port, servername: net.isIP(host) ? undefined : host, ALPNProtocols: ['http/1.1'] })
              : net.connect(port, host);
            direct.once(opts.protocol === 'https:' ? 'secureConnect' : 'connect', () => callback(null, direct));
            direct.once('error', (error) => callback(error));
            return;
          }
          tunnel(proxy, host, port, (error, socket) => {
            if (error) return callback(error);
            if (opts.protocol !== 'https:') return callback(null, socket);
            overTls(socket, { host, servername: opts.servername, ALPNProtocols: ['http/1.1'] }, callback);
          });
        },
      });
      globalThis[key] = dispatcher; // undici defines it writable, not configurable
    }
  }

  // http and https: agents whose connections are tunnels
  class TunnelAgent extends http.Agent {
    createConnection(options, callback) {
      if (bypassed(proxy, options.host, options.port)) return super.createConnection(options, callback);
      tunnel(proxy, options.host, options.port, callback);
      return undefined;
    }
  }
  class TunnelTlsAgent extends https.Agent {
    createConnection(options, callback) {
      if (bypassed(proxy, options.host, options.port)) return super.createConnection(options, callback);
      tunnel(proxy, options.host, options.port, (error, socket) => {
        if (error) return callback(error);
        overTls(socket, options, callback);
      });
      return undefined;
    }
  }
  http.globalAgent = new TunnelAgent({ keepAlive: true });
  https.globalAgent = new TunnelTlsAgent({ keepAlive: true });
}

function report(dir) {
  process.once('exit', () => {
    try {
      const line = JSON.stringify({
        runtime: `node ${process.versions.node}`,
        pid: process.pid,
        script: process.argv[1] ? path.basename(process.argv[1]) : '(no script)',
        tunnels,
      });
      fs.writeFileSync(path.join(dir, `node-${process.pid}.json`), line + '\n', { mode: 0o600 });
    } catch {
      // the directory went with its run: nothing to tell
    }
  });
}

if (given) {
  try {
    install(parseProxy(given));
  } catch (error) {
    process.emitWarning(`redirect-audit: Node's clients are not recorded: ${error.message}`);
  }
  if (process.env.REDIRECT_AUDIT_RUNTIMES) report(process.env.REDIRECT_AUDIT_RUNTIMES);
}
