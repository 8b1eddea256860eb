// Fork and snapshots with the official E2B JS SDK (unmodified) through `wrenn up`: a sandbox
// forked into 2 (each child has the parent's file, its own ID, and changes of its own), and a
// named snapshot that starts a sandbox after its source was killed, then is deleted.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { createSandbox, killAll, Sandbox } from './helpers.mjs'

after(killAll)

const run = randomUUID().slice(0, 8)

test('fork copies a sandbox into independent children', { timeout: 300_000 }, async () => {
  const parent = await createSandbox()
  await parent.files.write('/home/user/fork.txt', `parent ${run}`)
  const forks = await parent.fork({ count: 2, timeoutMs: 300_000 })
  const children = forks.filter((f) => f instanceof Sandbox)
  try {
    assert.equal(children.length, 2, `forks: ${forks}`)
    const ids = new Set([parent.sandboxId, ...children.map((c) => c.sandboxId)])
    assert.equal(ids.size, 3)
    for (const c of children) {
      assert.equal(await c.files.read('/home/user/fork.txt'), `parent ${run}`)
    }
    await children[0].files.write('/home/user/fork.txt', 'child 0')
    assert.equal(await children[1].files.read('/home/user/fork.txt'), `parent ${run}`)
    assert.equal(await parent.files.read('/home/user/fork.txt'), `parent ${run}`)
    assert.ok(await parent.isRunning())
  } finally {
    await Promise.allSettled(children.map((c) => c.kill()))
  }
})

test('a named snapshot outlives its source', { timeout: 300_000 }, async () => {
  const src = await createSandbox()
  await src.files.write('/home/user/snap.txt', `snapshot ${run}`)
  const name = `e2e-js-snap-${run}`
  const snap = await src.createSnapshot({ name })
  assert.ok(snap.snapshotId.includes(name), snap.snapshotId)
  await src.kill()
  const made = await Sandbox.create(snap.snapshotId, { timeoutMs: 300_000 })
  try {
    assert.equal(await made.files.read('/home/user/snap.txt'), `snapshot ${run}`)
  } finally {
    await made.kill()
  }
  assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), true)
  assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), false)
})
