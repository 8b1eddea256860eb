// The official E2B JS SDK, unmodified, in debug mode against a bare envd process
// (debug mode sends all envd traffic to localhost:49983 and skips the control plane).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { Sandbox, CommandExitError } from 'e2b'

const root = resolve(import.meta.dirname, '../..')
const envdBin = process.env.WRENN_ENVD_BIN ?? join(root, 'target/debug/envd')
let envd
let dir
let sbx

before(async () => {
  envd = spawn(envdBin, ['--listen', '127.0.0.1:49983', '--no-cgroups', '--no-port-forward'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  const lines = createInterface({ input: envd.stdout })
  await new Promise((ok, fail) => {
    lines.on('line', (l) => l.startsWith('listening on') && ok())
    envd.on('exit', (c) => fail(new Error(`envd exited with ${c}`)))
  })
  dir = mkdtempSync(join(tmpdir(), 'wrenn-js-'))
  sbx = await Sandbox.create({ debug: true })
})

after(() => {
  envd?.kill('SIGTERM')
  if (dir) rmSync(dir, { recursive: true, force: true })
})

test('commands: foreground with envs and cwd, exit codes', async () => {
  const r = await sbx.commands.run('echo $FOO; pwd', { envs: { FOO: 'js' }, cwd: dir })
  assert.equal(r.exitCode, 0)
  assert.equal(r.stdout, `js\n${dir}\n`)
  await assert.rejects(sbx.commands.run('exit 4'), (e) => e instanceof CommandExitError && e.exitCode === 4)
})

test('commands: background, stdin, list, kill', async () => {
  const h = await sbx.commands.run('read x; echo got:$x; sleep 600', { background: true, stdin: true })
  const pids = (await sbx.commands.list()).map((p) => p.pid)
  assert.ok(pids.includes(h.pid))
  await sbx.commands.sendStdin(h.pid, 'hey\n')
  for (let i = 0; i < 100 && !h.stdout.includes('got:hey'); i++) await new Promise((r) => setTimeout(r, 50))
  assert.ok(h.stdout.includes('got:hey'), h.stdout)
  assert.equal(await sbx.commands.kill(h.pid), true)
  assert.equal(await sbx.commands.kill(h.pid), false)
})

test('pty: create, input, resize', async () => {
  let out = ''
  const dec = new TextDecoder()
  const pty = await sbx.pty.create({ rows: 24, cols: 80, onData: (d) => (out += dec.decode(d)) })
  await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('stty size\n'))
  for (let i = 0; i < 200 && !out.includes('24 80'); i++) await new Promise((r) => setTimeout(r, 50))
  assert.ok(out.includes('24 80'), out)
  await sbx.pty.resize(pty.pid, { rows: 31, cols: 101 })
  await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('stty size\n'))
  for (let i = 0; i < 200 && !out.includes('31 101'); i++) await new Promise((r) => setTimeout(r, 50))
  assert.ok(out.includes('31 101'), out)
  assert.equal(await sbx.pty.kill(pty.pid), true)
})

test('files: write, read, list, exists, info, make_dir, rename, remove, watch', async () => {
  const p = `${dir}/a/x.txt`
  const info = await sbx.files.write(p, 'hello js')
  assert.equal(info.path, p)
  assert.equal(await sbx.files.read(p), 'hello js')
  const bytes = await sbx.files.read(p, { format: 'bytes' })
  assert.equal(Buffer.from(bytes).toString(), 'hello js')
  await sbx.files.write([
    { path: `${dir}/m/1.txt`, data: 'one' },
    { path: `${dir}/m/2.txt`, data: 'two' },
  ])
  assert.deepEqual((await sbx.files.list(`${dir}/m`)).map((e) => e.name).sort(), ['1.txt', '2.txt'])
  assert.equal(await sbx.files.exists(p), true)
  assert.equal(await sbx.files.exists(`${dir}/none`), false)
  assert.equal((await sbx.files.getInfo(p)).size, 8)
  assert.equal(await sbx.files.makeDir(`${dir}/d`), true)
  assert.equal(await sbx.files.makeDir(`${dir}/d`), false)
  const moved = await sbx.files.rename(p, `${dir}/d/y.txt`)
  assert.equal(moved.path, `${dir}/d/y.txt`)

  const events = []
  const w = await sbx.files.watchDir(`${dir}/d`, (e) => events.push(e))
  await sbx.files.write(`${dir}/d/new.txt`, 'n')
  for (let i = 0; i < 100 && !events.some((e) => e.name === 'new.txt'); i++) await new Promise((r) => setTimeout(r, 50))
  await w.stop()
  assert.ok(events.some((e) => e.name === 'new.txt'), JSON.stringify(events))

  await sbx.files.remove(`${dir}/d`)
  assert.equal(await sbx.files.exists(`${dir}/d`), false)
})
