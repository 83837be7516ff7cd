// keybroker from Node.js: Wrap -> Unwrap -> Rewrap over mTLS, an error code,
// and unwrapping a ciphertext another language made.
//
// usage: node roundtrip.js ADDR TLS_DIR PROTO_DIR FOREIGN_CIPHERTEXT_B64
// The proto files are loaded at run time with @grpc/proto-loader.
// Prints one JSON object; exits non-zero on any failure.
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [addr, tlsDir, protoDir, foreignB64] = process.argv.slice(2);
const definition = protoLoader.loadSync(path.join(protoDir, 'keybroker/v1/key_broker.proto'), {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).keybroker.v1;
const read = (name) => fs.readFileSync(path.join(tlsDir, name));
const creds = grpc.credentials.createSsl(read('ca.pem'), read('client.key'), read('client.pem'));
const client = new v1.KeyBroker(addr, creds, { 'grpc.ssl_target_name_override': 'localhost' });

const call = (method, request) =>
  new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10000);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });

async function main() {
  const context = { lang: 'node', tenant: 'acme' };
  const dek = Buffer.from([...Array(32).keys()].map((i) => 255 - i));
  const wrapped = await call('Wrap', { key: 'demo', plaintext: dek, context });
  const unwrapped = await call('Unwrap', { ciphertext: wrapped.ciphertext, context });
  if (!Buffer.from(unwrapped.plaintext).equals(dek)) throw new Error('unwrap returned another DEK');
  const rewrapped = await call('Rewrap', { ciphertext: wrapped.ciphertext, context });
  const again = await call('Unwrap', { ciphertext: rewrapped.ciphertext, context });
  if (!Buffer.from(again.plaintext).equals(dek)) throw new Error('rewrapped ciphertext opened to another DEK');

  let notFound = null;
  let notFoundMessage = null;
  try {
    await call('Wrap', { key: 'no-such-key', plaintext: dek });
    throw new Error('wrap under an unknown key succeeded');
  } catch (err) {
    if (err.code === undefined) throw err;
    notFound = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
    notFoundMessage = err.details;
  }

  const foreign = await call('Unwrap', {
    ciphertext: Buffer.from(foreignB64, 'base64'),
    context: { 'made-by': 'rust' },
  });
  console.log(
    JSON.stringify({
      wrap_key: wrapped.key,
      wrap_version: wrapped.version,
      unwrap_ok: true,
      rewrap_version: rewrapped.version,
      not_found: notFound,
      not_found_message: notFoundMessage,
      ciphertext_b64: Buffer.from(wrapped.ciphertext).toString('base64'),
      foreign_plaintext_hex: Buffer.from(foreign.plaintext).toString('hex'),
    }),
  );
  client.close();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
