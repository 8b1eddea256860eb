// Template builds with the official E2B JS SDK's `Template` builder (unmodified) through
// `wrenn up`: a build in the background polled to its end, a COPY context uploaded by the SDK,
// the template's files, env and running start command in a sandbox made from it, and a failing
// step's error. Two builds, each a microVM boot under TCG.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { mkdtempSync, mkdirSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  createSandbox,
  killAll,
  sleep,
  Template,
  BuildError,
  waitForFile,
} from './helpers.mjs'

after(killAll)

const run = randomUUID().slice(0, 8)

test('a template built in the background is usable once ready', { timeout: 900_000 }, async () => {
  const ctx = mkdtempSync(join(tmpdir(), 'wrenn-js-tpl-'))
  mkdirSync(join(ctx, 'site'))
  writeFileSync(join(ctx, 'site', 'index.txt'), `js context ${run}\n`)
  const name = `e2e-js-${run}`
  const tpl = Template({ fileContextPath: ctx })
    .fromTemplate('base')
    .copy('site', '/srv/site', { user: 'root' })
    .runCmd('echo "$(id -un) built this" > /srv/site/who.txt', { user: 'root' })
    .setEnvs({ JS_TEMPLATE: 'yes' })
    .setStartCmd('sh -c "sleep 1; touch /tmp/started; exec sleep infinity"', waitForFile('/tmp/started'))

  const info = await Template.buildInBackground(tpl, name)
  assert.equal(info.name, name)
  assert.match(info.buildId, /^[0-9a-f-]{36}$/)
  let status
  const logs = []
  let offset = 0
  const deadline = Date.now() + 800_000
  for (;;) {
    status = await Template.getBuildStatus(info, { logsOffset: offset })
    offset += status.logEntries.length
    logs.push(...status.logEntries.map((e) => e.message))
    if (status.status === 'ready' || status.status === 'error') break
    assert.ok(Date.now() < deadline, 'the build did not finish')
    await sleep(500)
  }
  assert.equal(status.status, 'ready', JSON.stringify(status.reason ?? logs))
  assert.ok(logs.some((l) => l.includes('[1/3] COPY site /srv/site')), logs.join('\n'))
  assert.ok(await Template.exists(name))

  const sbx = await createSandbox({ template: name })
  const cat = await sbx.commands.run('cat /srv/site/index.txt /srv/site/who.txt')
  assert.equal(cat.stdout, `js context ${run}\nroot built this\n`)
  const env = await sbx.commands.run('echo $JS_TEMPLATE')
  assert.equal(env.stdout, 'yes\n')
  // The start command was running in the snapshot.
  const ps = await sbx.commands.run('test -f /tmp/started && pgrep -f "sleep infinity"')
  assert.equal(ps.exitCode, 0)
})

test('a failing step fails Template.build with its exit code', { timeout: 900_000 }, async () => {
  const tpl = Template().fromTemplate('base').runCmd('echo js is failing; exit 3')
  const logs = []
  await assert.rejects(
    Template.build(tpl, `e2e-js-broken-${run}`, { onBuildLogs: (e) => logs.push(e.message) }),
    (err) => {
      assert.ok(err instanceof BuildError, String(err))
      assert.match(err.message, /exit code 3/)
      return true
    },
  )
  assert.ok(logs.some((l) => String(l).includes('js is failing')), logs.join('\n'))
})
