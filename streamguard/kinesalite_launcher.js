// Start kinesalite on 127.0.0.1 only (its CLI has no host flag and would listen on every
// interface). Usage: node kinesalite_launcher.js PORT [DATA_DIR]
// DATA_DIR keeps streams in LevelDB across restarts; without it they live in memory.
// `streamguard.local_kinesis` finds kinesalite for us through NODE_PATH.
'use strict'

const port = Number.parseInt(process.argv[2], 10)
const dataDir = process.argv[3]
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error('usage: node kinesalite_launcher.js PORT [DATA_DIR]')
  process.exit(2)
}

let kinesalite
try {
  kinesalite = require('kinesalite')
} catch (err) {
  console.error('kinesalite is not installed: run `npm install` in the repo root (make does this)')
  process.exit(3)
}

const options = {createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 1000}
if (dataDir) options.path = dataDir

// kinesalite rethrows a request's 'error' event (`req.on('error', function(err) { throw err })`),
// so a client that dies mid-request (a SIGKILLed worker, its readers' GetRecords in flight) took
// the whole server down, and every other client with it. A real Kinesis shrugs that off: so does
// this one. Anything else still ends the server.
process.on('uncaughtException', (err) => {
  if (err && (err.code === 'ECONNRESET' || err.code === 'EPIPE' || err.message === 'aborted')) {
    console.error(`a client went away mid-request (${err.code || err.message}); serving on`)
    return
  }
  console.error(err && err.stack ? err.stack : String(err))
  process.exit(1)
})

const server = kinesalite(options)
server.on('error', (err) => {
  console.error(`kinesalite failed: ${err.message}`)
  process.exit(1)
})
server.listen(port, '127.0.0.1', () => {
  const address = server.address()
  console.log(`kinesalite listening on http://${address.address}:${address.port} (pid ${process.pid})`)
})

// A process started in the background of a non-interactive shell inherits SIGINT/SIGTERM as
// ignored; installing handlers makes `stop()` work however the server was started.
let stopping = false
function shutdown(signal) {
  if (stopping) return
  stopping = true
  console.log(`kinesalite stopping (${signal})`)
  const force = setTimeout(() => process.exit(0), 2000)
  force.unref()
  server.close(() => process.exit(0))
  server.closeAllConnections()
}
process.on('SIGTERM', () => shutdown('SIGTERM'))
process.on('SIGINT', () => shutdown('SIGINT'))
process.on('SIGHUP', () => shutdown('SIGHUP'))
