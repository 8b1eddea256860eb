// Filesystem operations, watches and signed URLs through `wrenn up` with the official E2B JS SDK.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import {
  createSandbox,
  killAll,
  sleep,
  waitFor,
  FileType,
  FilesystemEventType,
  NotFoundError,
} from './helpers.mjs'

let sbx
const D = '/home/user/e2e-js'

before(async () => {
  sbx = await createSandbox()
})

after(killAll)

const sha = (b) => createHash('sha256').update(b).digest('hex')

async function readAll(stream) {
  const chunks = []
  for await (const c of stream) chunks.push(Buffer.from(c))
  return Buffer.concat(chunks)
}

test('write and read: text, bytes, Blob, ReadableStream, gzip', async () => {
  // Text, into a directory that does not exist yet.
  const info = await sbx.files.write(`${D}/text/hello.txt`, 'héllo wörld\n')
  assert.equal(info.path, `${D}/text/hello.txt`)
  assert.equal(info.name, 'hello.txt')
  assert.equal(info.type, FileType.FILE)
  assert.equal(await sbx.files.read(`${D}/text/hello.txt`), 'héllo wörld\n')
  // Overwrite replaces the whole content.
  await sbx.files.write(`${D}/text/hello.txt`, 'short')
  assert.equal(await sbx.files.read(`${D}/text/hello.txt`), 'short')
  // The guest sees exactly these bytes.
  assert.equal((await sbx.commands.run(`cat ${D}/text/hello.txt`)).stdout, 'short')

  // Every byte value, as an ArrayBuffer and as a Uint8Array.
  const all = new Uint8Array(256).map((_, i) => i)
  await sbx.files.write(`${D}/bin/ab.bin`, all.buffer)
  await sbx.files.write(`${D}/bin/u8.bin`, all)
  for (const p of ['ab.bin', 'u8.bin']) {
    const back = await sbx.files.read(`${D}/bin/${p}`, { format: 'bytes' })
    assert.ok(back instanceof Uint8Array)
    assert.deepEqual(Buffer.from(back), Buffer.from(all), p)
  }
  assert.equal(
    (await sbx.commands.run(`sha256sum ${D}/bin/u8.bin`)).stdout.split(' ')[0],
    sha(all),
  )

  // Blob in, Blob out.
  await sbx.files.write(`${D}/blob.txt`, new Blob(['from ', 'a blob']))
  const blob = await sbx.files.read(`${D}/blob.txt`, { format: 'blob' })
  assert.ok(blob instanceof Blob)
  assert.equal(blob.size, 11)
  assert.equal(await blob.text(), 'from a blob')

  // A 3 MiB ReadableStream (streamed upload), read back as a stream.
  const big = randomBytes(3 * 1024 * 1024)
  const src = new ReadableStream({
    start(c) {
      for (let i = 0; i < big.length; i += 64 * 1024) c.enqueue(big.subarray(i, i + 64 * 1024))
      c.close()
    },
  })
  const w = await sbx.files.write(`${D}/stream.bin`, src)
  assert.equal(w.path, `${D}/stream.bin`)
  const stream = await sbx.files.read(`${D}/stream.bin`, { format: 'stream' })
  const got = await readAll(stream)
  assert.equal(got.length, big.length)
  assert.equal(sha(got), sha(big))
  assert.equal((await sbx.files.getInfo(`${D}/stream.bin`)).size, big.length)

  // gzip-encoded upload and download.
  const text = 'compress me '.repeat(5000)
  await sbx.files.write(`${D}/gz.txt`, text, { gzip: true })
  assert.equal(await sbx.files.read(`${D}/gz.txt`, { gzip: true }), text)
  assert.equal(await sbx.files.read(`${D}/gz.txt`), text)
  assert.equal((await sbx.commands.run(`wc -c < ${D}/gz.txt`)).stdout.trim(), String(text.length))

  // Empty file.
  await sbx.files.write(`${D}/empty`, '')
  assert.equal(await sbx.files.read(`${D}/empty`), '')
  assert.equal((await sbx.files.getInfo(`${D}/empty`)).size, 0)
})

test('write many files at once', async () => {
  const infos = await sbx.files.write([
    { path: `${D}/many/a.txt`, data: 'A' },
    { path: `${D}/many/sub/b.bin`, data: new Uint8Array([0, 1, 2]) },
    { path: `${D}/many/c.txt`, data: new Blob(['C']) },
  ])
  assert.equal(infos.length, 3)
  assert.deepEqual(infos.map((i) => i.path).sort(), [
    `${D}/many/a.txt`,
    `${D}/many/c.txt`,
    `${D}/many/sub/b.bin`,
  ])
  assert.equal(await sbx.files.read(`${D}/many/a.txt`), 'A')
  assert.deepEqual([...(await sbx.files.read(`${D}/many/sub/b.bin`, { format: 'bytes' }))], [0, 1, 2])
  assert.equal(await sbx.files.read(`${D}/many/c.txt`), 'C')

  // As the default user, outside its home and below directories that do not exist yet:
  // envd makes them and gives them, and the files, to the user (as upstream envd does).
  const top = `/js-${randomBytes(4).toString('hex')}`
  const outside = await sbx.files.write([
    { path: `${top}/x/one.txt`, data: 'one' },
    { path: `${D}/many/two.txt`, data: 'two' },
  ])
  assert.deepEqual(outside.map((i) => i.path), [`${top}/x/one.txt`, `${D}/many/two.txt`])
  assert.equal(await sbx.files.read(`${top}/x/one.txt`), 'one')
  assert.equal(
    (await sbx.commands.run(`stat -c '%U' ${top} ${top}/x/one.txt && sudo rm -r ${top}`)).stdout,
    'user\nuser\n',
  )
})

test('list, exists, getInfo, makeDir, rename, remove', async () => {
  await sbx.files.write([
    { path: `${D}/ls/one.txt`, data: '1' },
    { path: `${D}/ls/two.txt`, data: '22' },
    { path: `${D}/ls/deep/three.txt`, data: '333' },
  ])
  const entries = await sbx.files.list(`${D}/ls`)
  assert.deepEqual(entries.map((e) => e.name).sort(), ['deep', 'one.txt', 'two.txt'])
  const byName = Object.fromEntries(entries.map((e) => [e.name, e]))
  assert.equal(byName['deep'].type, FileType.DIR)
  assert.equal(byName['two.txt'].type, FileType.FILE)
  assert.equal(byName['two.txt'].size, 2)
  assert.equal(byName['two.txt'].path, `${D}/ls/two.txt`)
  const deep = await sbx.files.list(`${D}/ls`, { depth: 2 })
  assert.ok(deep.some((e) => e.path === `${D}/ls/deep/three.txt`), JSON.stringify(deep))

  assert.equal(await sbx.files.exists(`${D}/ls/one.txt`), true)
  assert.equal(await sbx.files.exists(`${D}/ls`), true)
  assert.equal(await sbx.files.exists(`${D}/ls/none`), false)

  const fi = await sbx.files.getInfo(`${D}/ls/deep/three.txt`)
  assert.equal(fi.type, FileType.FILE)
  assert.equal(fi.size, 3)
  assert.equal(fi.name, 'three.txt')
  assert.equal(fi.owner, 'user')
  assert.equal(fi.permissions, '-rw-r--r--')
  assert.ok(fi.modifiedTime instanceof Date)
  assert.ok(Math.abs(fi.modifiedTime.getTime() - Date.now()) < 120_000, String(fi.modifiedTime))
  assert.equal((await sbx.files.getInfo(`${D}/ls`)).type, FileType.DIR)
  await assert.rejects(sbx.files.getInfo(`${D}/ls/none`), NotFoundError)
  await assert.rejects(sbx.files.read(`${D}/ls/none`), NotFoundError)

  assert.equal(await sbx.files.makeDir(`${D}/made/a/b`), true)
  assert.equal(await sbx.files.makeDir(`${D}/made/a/b`), false)
  assert.equal((await sbx.files.getInfo(`${D}/made/a/b`)).type, FileType.DIR)

  const moved = await sbx.files.rename(`${D}/ls/one.txt`, `${D}/made/a/b/uno.txt`)
  assert.equal(moved.path, `${D}/made/a/b/uno.txt`)
  assert.equal(moved.name, 'uno.txt')
  assert.equal(await sbx.files.exists(`${D}/ls/one.txt`), false)
  assert.equal(await sbx.files.read(`${D}/made/a/b/uno.txt`), '1')

  await sbx.files.remove(`${D}/ls/two.txt`)
  assert.equal(await sbx.files.exists(`${D}/ls/two.txt`), false)
  await sbx.files.remove(`${D}/made`)
  assert.equal(await sbx.files.exists(`${D}/made`), false)

  // Root-owned places: an upload is written by envd and given to whoever asked, as upstream
  // envd does (the access token's holder can run anything as root anyway).
  await sbx.files.write('/root/js-by-user.txt', 'x')
  assert.equal((await sbx.files.getInfo('/root/js-by-user.txt', { user: 'root' })).owner, 'user')
  await sbx.files.write('/root/js-ok.txt', 'x', { user: 'root' })
  assert.equal((await sbx.files.getInfo('/root/js-ok.txt', { user: 'root' })).owner, 'root')
})

test('watchDir: events in the directory, recursive events, stop', async () => {
  const dir = `${D}/watched`
  await sbx.files.makeDir(`${dir}/sub`)

  const flat = []
  const w = await sbx.files.watchDir(dir, (e) => flat.push(e))
  await sbx.files.write(`${dir}/new.txt`, 'n')
  await sbx.files.rename(`${dir}/new.txt`, `${dir}/renamed.txt`)
  await sbx.files.remove(`${dir}/renamed.txt`)
  await sbx.files.write(`${dir}/sub/nested.txt`, 'not seen by a flat watch')
  const has = (evs, name, type) => evs.some((e) => e.name === name && e.type === type)
  await waitFor(() => has(flat, 'new.txt', FilesystemEventType.CREATE), `create of new.txt in ${JSON.stringify(flat)}`)
  await waitFor(() => has(flat, 'renamed.txt', FilesystemEventType.REMOVE), `remove of renamed.txt in ${JSON.stringify(flat)}`)
  assert.ok(has(flat, 'new.txt', FilesystemEventType.WRITE), JSON.stringify(flat))
  assert.ok(
    flat.some((e) => e.type === FilesystemEventType.RENAME),
    `rename event in ${JSON.stringify(flat)}`,
  )
  await w.stop()
  await sleep(300)
  const n = flat.length
  await sbx.files.write(`${dir}/after-stop.txt`, 'x')
  await sleep(1000)
  assert.equal(flat.length, n, `events after stop: ${JSON.stringify(flat.slice(n))}`)
  assert.ok(!flat.some((e) => e.name.includes('nested')), JSON.stringify(flat))

  const rec = []
  const wr = await sbx.files.watchDir(dir, (e) => rec.push(e), { recursive: true })
  try {
    await sbx.files.write(`${dir}/sub/deep.txt`, 'deep')
    await sbx.files.makeDir(`${dir}/sub/newdir`)
    await sbx.files.write(`${dir}/sub/newdir/deeper.txt`, 'deeper')
    await waitFor(
      () => rec.some((e) => e.name === 'sub/deep.txt' && e.type === FilesystemEventType.CREATE),
      `recursive create of sub/deep.txt in ${JSON.stringify(rec)}`,
    )
    // A directory created after the watch started is watched too.
    await waitFor(
      () => rec.some((e) => e.name === 'sub/newdir/deeper.txt'),
      `event for sub/newdir/deeper.txt in ${JSON.stringify(rec)}`,
    )
  } finally {
    await wr.stop()
  }
})

test('signed upload and download URLs work with plain fetch', async () => {
  const p = `${D}/signed/up.txt`
  const up = await sbx.uploadUrl(p, { useSignatureExpiration: 120 })
  const u = new URL(up)
  assert.equal(u.origin, new URL(process.env.E2B_SANDBOX_URL).origin)
  assert.ok(u.searchParams.get('signature')?.startsWith('v1_'), up)
  assert.ok(u.searchParams.get('signature_expiration'), up)
  const form = new FormData()
  form.append('file', new Blob(['uploaded via a signed url']), 'up.txt')
  // No SDK, no E2b-Sandbox-Id header, no access token: the URL alone must route and authorize.
  const r = await fetch(up, { method: 'POST', body: form })
  assert.equal(r.status, 200, await r.clone().text())
  const body = await r.json()
  assert.equal(body[0].path, p)
  assert.equal(await sbx.files.read(p), 'uploaded via a signed url')

  await sbx.files.write(`${D}/signed/down.bin`, new Uint8Array([9, 8, 7, 0, 255]))
  const down = await sbx.downloadUrl(`${D}/signed/down.bin`, { useSignatureExpiration: 120 })
  const d = await fetch(down)
  assert.equal(d.status, 200)
  assert.deepEqual([...new Uint8Array(await d.arrayBuffer())], [9, 8, 7, 0, 255])

  // Without expiration, too.
  const plain = await sbx.downloadUrl(`${D}/signed/up.txt`)
  assert.equal(await (await fetch(plain)).text(), 'uploaded via a signed url')

  // A signature for another path, a forged signature and an expired one are refused.
  const other = new URL(down)
  other.searchParams.set('path', `${D}/signed/up.txt`)
  assert.ok(!(await fetch(other)).ok, 'signature reused for another path')
  const forged = new URL(down)
  forged.searchParams.set('signature', 'v1_' + 'A'.repeat(43))
  assert.ok(!(await fetch(forged)).ok, 'forged signature')
  const expired = await sbx.downloadUrl(`${D}/signed/down.bin`, { useSignatureExpiration: -60 })
  const e = await fetch(expired)
  assert.ok([401, 403].includes(e.status), `expired signature answered ${e.status}`)
})
