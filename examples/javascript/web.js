// A wasmproc web process type in JavaScript (componentize-js, fetch event).
//
//   GET  /       a greeting
//   POST /echo   the request body, back
//   GET  /env    GREETING from the formation's `env`, `greeting` from its `config`
//
// A fetch-event guest answers one request per instance, so wasmproc retires
// each instance after its first request, whatever `reuse` says.
import { getEnvironment } from 'wasi:cli/environment@0.2.10';
import { get as config } from 'wasi:config/store@0.2.0-rc.1';

addEventListener('fetch', (event) => event.respondWith(answer(event.request)));

async function answer(request) {
  const { pathname } = new URL(request.url);
  if (pathname === '/echo' && request.method === 'POST') {
    const body = await request.arrayBuffer();
    return new Response(body, {
      headers: { 'content-type': 'application/octet-stream' },
    });
  }
  if (pathname === '/env') {
    const env = new Map(getEnvironment());
    return new Response(`${env.get('GREETING')}, ${config('greeting')}\n`);
  }
  if (pathname === '/') {
    return new Response('Hello from JavaScript\n');
  }
  return new Response(`no page at ${pathname}\n`, { status: 404 });
}
