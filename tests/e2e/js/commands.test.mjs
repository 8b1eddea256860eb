// Commands and PTY through `wrenn up` with the official E2B JS SDK.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  createSandbox,
  killAll,
  waitFor,
  CommandExitError,
  TimeoutError,
} from './helpers.mjs'

let sbx

before(async () => {
  sbx = await createSandbox()
})

after(killAll)

test('foreground: envs, cwd, stdout/stderr callbacks, exit code', async () => {
  const out = []
  const err = []
  const r = await sbx.commands.run('echo "$FOO-$BAR"; pwd; echo oops >&2; printf "%s" tail', {
    envs: { FOO: 'js', BAR: 'sdk' },
    cwd: '/tmp',
    onStdout: (d) => out.push(d),
    onStderr: (d) => err.push(d),
  })
  assert.equal(r.exitCode, 0)
  assert.equal(r.stdout, 'js-sdk\n/tmp\ntail')
  assert.equal(r.stderr, 'oops\n')
  assert.equal(out.join(''), r.stdout)
  assert.equal(err.join(''), r.stderr)

  // Defaults: the template's default user and its home directory.
  const d = await sbx.commands.run('id -un; pwd')
  assert.equal(d.stdout, 'user\n/home/user\n')

  await assert.rejects(sbx.commands.run('echo partial; echo bad >&2; exit 7'), (e) => {
    assert.ok(e instanceof CommandExitError, String(e))
    assert.equal(e.exitCode, 7)
    assert.equal(e.stdout, 'partial\n')
    assert.equal(e.stderr, 'bad\n')
    return true
  })
})

test('user: root vs the default user', async () => {
  const root = await sbx.commands.run('id -un; id -u; echo $HOME', { user: 'root' })
  assert.equal(root.stdout, 'root\n0\n/root\n')
  const user = await sbx.commands.run('id -un; echo $HOME', { user: 'user' })
  assert.equal(user.stdout, 'user\n/home/user\n')
  // The user matters for permissions, not just for the name.
  await assert.rejects(sbx.commands.run('touch /root/nope', { user: 'user' }), CommandExitError)
  await sbx.commands.run('touch /root/yes', { user: 'root' })
})

test('timeoutMs ends a command that runs too long', async () => {
  const t0 = Date.now()
  await assert.rejects(sbx.commands.run('sleep 30', { timeoutMs: 2000 }), (e) => {
    assert.ok(e instanceof TimeoutError, `${e?.constructor?.name}: ${e?.message}`)
    return true
  })
  const took = Date.now() - t0
  assert.ok(took >= 1900 && took < 15_000, `took ${took} ms`)
  // The process itself is gone, not only the client's wait.
  await waitFor(
    async () => (await sbx.commands.list()).every((p) => !p.args.join(' ').includes('sleep 30')),
    'the timed-out sleep to disappear from commands.list()',
  )
})

test('background: envs and cwd, wait for the result', async () => {
  const h = await sbx.commands.run('sleep 0.5; echo "$X in $(pwd)"', {
    background: true,
    envs: { X: 'bg' },
    cwd: '/usr',
  })
  assert.ok(h.pid > 0)
  const r = await h.wait()
  assert.equal(r.exitCode, 0)
  assert.equal(r.stdout, 'bg in /usr\n')
})

test('background: stdin, list, connect, kill', async () => {
  const seen = []
  const h = await sbx.commands.run('read x; echo "got:$x"; read y; echo "then:$y"; sleep 600', {
    background: true,
    stdin: true,
    onStdout: (d) => seen.push(d),
  })
  assert.ok(h.pid > 0)

  const listed = (await sbx.commands.list()).find((p) => p.pid === h.pid)
  assert.ok(listed, 'the background command is in commands.list()')
  assert.equal(listed.cmd, '/bin/bash')
  assert.ok(listed.args.join(' ').includes('read x'), JSON.stringify(listed))

  await sbx.commands.sendStdin(h.pid, 'hey\n')
  await waitFor(() => h.stdout.includes('got:hey'), 'got:hey on the first handle')
  assert.ok(seen.join('').includes('got:hey'))

  // A second client attaches to the same process and sees what it prints from now on.
  const later = []
  const h2 = await sbx.commands.connect(h.pid, { onStdout: (d) => later.push(d) })
  assert.equal(h2.pid, h.pid)
  await sbx.commands.sendStdin(h.pid, 'two\n')
  await waitFor(() => later.join('').includes('then:two'), 'then:two on the connected handle')
  await waitFor(() => h.stdout.includes('then:two'), 'then:two on the first handle')

  assert.equal(await sbx.commands.kill(h.pid), true)
  for (const handle of [h, h2]) {
    await assert.rejects(handle.wait(), (e) => {
      assert.ok(e instanceof CommandExitError, String(e))
      assert.notEqual(e.exitCode, 0)
      return true
    })
  }
  assert.equal(await sbx.commands.kill(h.pid), false)
  assert.ok(!(await sbx.commands.list()).some((p) => p.pid === h.pid))

  // handle.kill() on another process.
  const h3 = await sbx.commands.run('sleep 600', { background: true })
  assert.equal(await h3.kill(), true)
  await assert.rejects(h3.wait(), CommandExitError)
})

test('pty: create, onData, input, resize, kill', async () => {
  let out = ''
  const dec = new TextDecoder()
  const enc = new TextEncoder()
  const pty = await sbx.pty.create({
    rows: 24,
    cols: 80,
    onData: (d) => {
      out += dec.decode(d, { stream: true })
    },
  })
  assert.ok(pty.pid > 0)
  // `$((6*7))` is echoed verbatim but evaluated only in the output, so a match is real output.
  await sbx.pty.sendInput(pty.pid, enc.encode('stty size; echo "tty:$(tty) v=$((6*7))"\n'))
  await waitFor(() => out.includes('v=42'), `pty output, got ${JSON.stringify(out)}`)
  assert.ok(out.includes('24 80'), out)
  assert.match(out, /tty:\/dev\/pts\/\d+/)

  await sbx.pty.resize(pty.pid, { rows: 31, cols: 101 })
  await sbx.pty.sendInput(pty.pid, enc.encode('stty size\n'))
  await waitFor(() => out.includes('31 101'), `resized size, got ${JSON.stringify(out)}`)

  assert.equal(await sbx.pty.kill(pty.pid), true)
  await assert.rejects(pty.wait(), CommandExitError)
  assert.ok(!(await sbx.commands.list()).some((p) => p.pid === pty.pid))
})
