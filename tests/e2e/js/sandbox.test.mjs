// Sandbox lifecycle through `wrenn up` with the official E2B JS SDK: several sandboxes at once,
// info, timeout, metrics, list with filters and pagination, pause/resume, kill.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import {
  createSandbox,
  killAll,
  runTag,
  sleep,
  waitFor,
  Sandbox,
  AuthenticationError,
  NotFoundError,
} from './helpers.mjs'

after(killAll)

/** All pages of `Sandbox.list(opts)`, and the page sizes. */
async function listAll(opts) {
  const p = Sandbox.list(opts)
  const items = []
  const pages = []
  while (p.hasNext) {
    const page = await p.nextItems()
    pages.push(page.length)
    items.push(...page)
    assert.ok(pages.length < 50, 'pagination does not end')
  }
  return { items, pages }
}

test('two sandboxes at once are isolated from each other', async () => {
  const [a, b] = await Promise.all([createSandbox(), createSandbox()])
  try {
    assert.notEqual(a.sandboxId, b.sandboxId)
    await Promise.all([
      a.files.write('/home/user/who.txt', 'I am A'),
      b.files.write('/home/user/who.txt', 'I am B'),
    ])
    await a.files.write('/tmp/only-in-a', 'a')
    const [ra, rb] = await Promise.all([
      a.commands.run('cat /home/user/who.txt; ls /tmp'),
      b.commands.run('cat /home/user/who.txt; ls /tmp'),
    ])
    assert.ok(ra.stdout.startsWith('I am A'), ra.stdout)
    assert.ok(rb.stdout.startsWith('I am B'), rb.stdout)
    assert.ok(ra.stdout.includes('only-in-a'))
    assert.ok(!rb.stdout.includes('only-in-a'), rb.stdout)
    assert.equal(await b.files.exists('/tmp/only-in-a'), false)

    // Processes are separate too, and both sandboxes serve commands concurrently.
    const ha = await a.commands.run('sleep 600', { background: true })
    assert.ok((await a.commands.list()).some((p) => p.pid === ha.pid))
    assert.ok(!(await b.commands.list()).some((p) => p.args.join(' ').includes('sleep 600')))
    const both = await Promise.all([a, b].map((s) => s.commands.run('sleep 1; echo done')))
    assert.deepEqual(both.map((r) => r.stdout), ['done\n', 'done\n'])

    const ids = (await listAll({ query: { metadata: { run: runTag } } })).items.map((s) => s.sandboxId)
    assert.ok(ids.includes(a.sandboxId) && ids.includes(b.sandboxId), JSON.stringify(ids))
  } finally {
    await Promise.allSettled([a.kill(), b.kill()])
  }
})

test('getInfo, setTimeout and getMetrics', async () => {
  const before = Date.now()
  const sbx = await createSandbox({ timeoutMs: 300_000, metadata: { purpose: 'info' } })
  try {
    const info = await sbx.getInfo()
    assert.equal(info.sandboxId, sbx.sandboxId)
    assert.equal(info.templateId, 'base')
    assert.equal(info.state, 'running')
    assert.equal(info.metadata.purpose, 'info')
    assert.equal(info.metadata.run, runTag)
    assert.ok(info.cpuCount >= 1, String(info.cpuCount))
    assert.ok(info.memoryMB > 0, String(info.memoryMB))
    assert.match(info.envdVersion, /^\d+\.\d+\.\d+$/)
    assert.ok(info.startedAt instanceof Date && info.endAt instanceof Date)
    assert.ok(Math.abs(info.startedAt.getTime() - before) < 30_000, `startedAt ${info.startedAt}`)
    const ttl = info.endAt.getTime() - info.startedAt.getTime()
    assert.ok(Math.abs(ttl - 300_000) < 5_000, `endAt - startedAt = ${ttl} ms`)

    // The static form answers the same.
    const same = await Sandbox.getInfo(sbx.sandboxId)
    assert.equal(same.sandboxId, sbx.sandboxId)
    assert.deepEqual(same.metadata, info.metadata)

    // setTimeout moves the end to now + timeout (shorter or longer than before).
    await sbx.setTimeout(120_000)
    const t1 = Date.now()
    const shorter = (await sbx.getInfo()).endAt.getTime()
    assert.ok(Math.abs(shorter - (t1 + 120_000)) < 10_000, `endAt ${new Date(shorter).toISOString()}`)
    await sbx.setTimeout(900_000)
    const t2 = Date.now()
    const longer = (await sbx.getInfo()).endAt.getTime()
    assert.ok(Math.abs(longer - (t2 + 900_000)) < 10_000, `endAt ${new Date(longer).toISOString()}`)

    const metrics = await waitFor(async () => {
      const m = await sbx.getMetrics()
      return m.length >= 1 && m
    }, 'at least one metrics sample', 30_000)
    for (const m of metrics) {
      assert.ok(m.timestamp instanceof Date && !isNaN(m.timestamp), String(m.timestamp))
      assert.ok(m.cpuCount >= 1, JSON.stringify(m))
      assert.ok(m.cpuUsedPct >= 0 && m.cpuUsedPct <= 100 * m.cpuCount, JSON.stringify(m))
      assert.ok(m.memTotal > 0, JSON.stringify(m))
      assert.ok(m.memUsed > 0 && m.memUsed <= m.memTotal, JSON.stringify(m))
      assert.ok(m.diskTotal > 0 && m.diskUsed > 0 && m.diskUsed <= m.diskTotal, JSON.stringify(m))
    }
    const last = metrics[metrics.length - 1]
    assert.ok(Math.abs(last.timestamp.getTime() - Date.now()) < 120_000, String(last.timestamp))
  } finally {
    await sbx.kill()
  }
})

test('list: metadata and state filters, pagination', async () => {
  const group = randomUUID()
  const sbxs = await Promise.all(
    [0, 1, 2].map((i) => createSandbox({ metadata: { group, idx: String(i) } })),
  )
  try {
    const ids = sbxs.map((s) => s.sandboxId).sort()
    assert.equal(await sbxs[2].pause(), true)

    const all = await listAll({ query: { metadata: { group } } })
    assert.deepEqual(all.items.map((s) => s.sandboxId).sort(), ids)
    for (const s of all.items) {
      assert.equal(s.metadata.group, group)
      assert.equal(s.templateId, 'base')
      assert.equal(s.state, s.sandboxId === sbxs[2].sandboxId ? 'paused' : 'running')
    }

    const running = await listAll({ query: { metadata: { group }, state: ['running'] } })
    assert.deepEqual(
      running.items.map((s) => s.sandboxId).sort(),
      [sbxs[0].sandboxId, sbxs[1].sandboxId].sort(),
    )
    const paused = await listAll({ query: { metadata: { group }, state: ['paused'] } })
    assert.deepEqual(paused.items.map((s) => s.sandboxId), [sbxs[2].sandboxId])

    // Several metadata keys are ANDed.
    const one = await listAll({ query: { metadata: { group, idx: '1' } } })
    assert.deepEqual(one.items.map((s) => s.sandboxId), [sbxs[1].sandboxId])
    const none = await listAll({ query: { metadata: { group, idx: '7' } } })
    assert.deepEqual(none.items, [])

    // limit 1: three pages of one, each sandbox exactly once, then hasNext is false.
    const p = Sandbox.list({ query: { metadata: { group } }, limit: 1 })
    assert.equal(p.hasNext, true)
    const seen = []
    while (p.hasNext) {
      const page = await p.nextItems()
      assert.ok(page.length <= 1, `page of ${page.length} with limit 1`)
      seen.push(...page.map((s) => s.sandboxId))
      assert.ok(seen.length <= 3, JSON.stringify(seen))
    }
    assert.deepEqual([...seen].sort(), ids)
    assert.equal(p.hasNext, false)
    // Pagination with a state filter.
    const pr = await listAll({ query: { metadata: { group }, state: ['running'] }, limit: 1 })
    assert.equal(pr.items.length, 2)
    assert.ok(pr.pages.every((n) => n <= 1), JSON.stringify(pr.pages))
  } finally {
    await Promise.allSettled(sbxs.map((s) => s.kill()))
  }
})

test('pause, then connect resumes with files and process memory intact', async () => {
  const sbx = await createSandbox()
  const id = sbx.sandboxId
  try {
    await sbx.files.write('/home/user/state.txt', 'kept across pause')
    // A process holding a random value only in its memory, waiting on stdin.
    const h = await sbx.commands.run(
      'v=$RANDOM$RANDOM$RANDOM; echo "v=$v"; read line; echo "after:$line:$v"; sleep 600',
      { background: true, stdin: true },
    )
    const v = (await waitFor(() => /v=(\d+)/.exec(h.stdout), 'the value'))[1]
    await h.disconnect()

    assert.equal(await sbx.pause(), true)
    assert.equal((await Sandbox.getInfo(id)).state, 'paused')
    // Pausing a paused sandbox reports false (409), and does not break it.
    assert.equal(await sbx.pause(), false)
    assert.equal(await sbx.isRunning(), false)

    const t0 = Date.now()
    const again = await Sandbox.connect(id)
    const resumeMs = Date.now() - t0
    assert.equal(again.sandboxId, id)
    assert.equal((await again.getInfo()).state, 'running')
    assert.equal(await again.isRunning(), true)
    assert.equal(await again.files.read('/home/user/state.txt'), 'kept across pause')

    // The same process (same pid) still runs and still has its value.
    assert.ok((await again.commands.list()).some((p) => p.pid === h.pid), 'process survived')
    let out = ''
    const h2 = await again.commands.connect(h.pid, { onStdout: (d) => (out += d) })
    await again.commands.sendStdin(h.pid, 'ping\n')
    await waitFor(() => out.includes(`after:ping:${v}`), `after:ping:${v} (got ${JSON.stringify(out)})`)
    assert.equal(await again.commands.kill(h.pid), true)
    await h2.wait().catch(() => {})

    // The guest's clock follows the host's after a resume.
    const guest = Number((await again.commands.run('date +%s')).stdout.trim())
    assert.ok(Math.abs(guest - Date.now() / 1000) < 10, `guest clock ${guest}, host ${Date.now() / 1000}`)

    // Connecting to a running sandbox is a plain connect: nothing restarts.
    const third = await Sandbox.connect(id)
    assert.equal(await third.files.read('/home/user/state.txt'), 'kept across pause')
    console.log(`# resume through Sandbox.connect took ${resumeMs} ms`)
  } finally {
    await Sandbox.kill(id)
  }
})

test('kill: the sandbox is then not found', async () => {
  const sbx = await createSandbox()
  const id = sbx.sandboxId
  await sbx.files.write('/home/user/x', 'x')
  // startedAfter is "at or after": the sandbox's own start finds it, a later instant does not.
  const { startedAt } = await sbx.getInfo()
  const after = async (t) =>
    (await listAll({ query: { metadata: { run: runTag }, startedAfter: t } })).items.map((s) => s.sandboxId)
  assert.ok((await after(startedAt)).includes(id))
  assert.ok(!(await after(new Date(startedAt.getTime() + 1))).includes(id))
  // A background command's wait ends as soon as the sandbox is killed, not at a timeout.
  const bg = await sbx.commands.run('sleep 600', { background: true })
  const waited = bg.wait().then(
    () => 'resolved',
    (e) => e,
  )
  await sleep(500)
  const killedAt = Date.now()
  assert.equal(await sbx.kill(), true)
  const outcome = await Promise.race([waited, sleep(20_000).then(() => 'still waiting')])
  assert.ok(outcome instanceof Error, `wait() after kill: ${outcome}`)
  assert.ok(Date.now() - killedAt < 20_000)
  assert.equal(await sbx.kill(), false)
  assert.equal(await Sandbox.kill(id), false)

  await assert.rejects(Sandbox.connect(id), (e) => {
    assert.ok(e instanceof NotFoundError, `${e?.constructor?.name}: ${e?.message}`)
    return true
  })
  await assert.rejects(Sandbox.getInfo(id), NotFoundError)
  await assert.rejects(sbx.getInfo(), NotFoundError)
  assert.equal(await sbx.isRunning(), false)
  // The old handle's envd operations fail as "not running" (the proxy's 502 "was not found").
  await assert.rejects(sbx.commands.run('echo hi'), NotFoundError)
  await assert.rejects(sbx.files.read('/home/user/x'), (e) => e instanceof Error)
  await assert.rejects(sbx.files.write('/home/user/y', 'y'), (e) => e instanceof Error)
  const listed = (await listAll({ query: { metadata: { run: runTag } } })).items
  assert.ok(!listed.some((s) => s.sandboxId === id), 'killed sandbox still listed')
})

test('a new sandbox answers its first request, also right after another was killed', async () => {
  // Network slots are reused: connections left over from a killed sandbox must not be used
  // for the next one on the same slot.
  for (let round = 0; round < 3; round++) {
    const a = await createSandbox()
    try {
      const first = await a.commands.run('echo first').catch((e) => {
        throw new Error(`round ${round}: the first command failed: ${e.message}`, { cause: e })
      })
      assert.equal(first.stdout, 'first\n', `round ${round}`)
      // Several connections at once, left idle in any pool on the way.
      const many = await Promise.all([1, 2, 3, 4].map((i) => a.commands.run(`echo ${i}`)))
      assert.deepEqual(many.map((r) => r.stdout), ['1\n', '2\n', '3\n', '4\n'])
    } finally {
      assert.equal(await a.kill(), true)
    }
  }
})

test('a wrong API key is refused', async () => {
  await assert.rejects(
    Sandbox.create({ apiKey: 'e2b_0000000000000000000000000000000000000000' }),
    AuthenticationError,
  )
  await assert.rejects(
    Sandbox.list({ apiKey: 'e2b_0000000000000000000000000000000000000000' }).nextItems(),
    AuthenticationError,
  )
})
