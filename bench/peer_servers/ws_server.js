// Node `ws` peer: rooms of plain WebSocket clients; a publisher on /pub sends "<game>\n<frame>".
// Subscribers send {"event":"settings","data":{"games":[...]}} and get a settings answer.
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2]);
const rooms = new Map();
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false, clientTracking: false });

wss.on('connection', (ws, req) => {
  if (req.url.startsWith('/pub')) {
    ws.on('message', (data) => {
      const cut = data.indexOf(10);
      const room = rooms.get(data.toString('latin1', 0, cut));
      if (!room) return;
      const frame = data.subarray(cut + 1);
      for (const client of room) client.send(frame, { binary: false });
    });
    return;
  }
  ws.games = [];
  ws.on('message', (data) => {
    let games;
    try { games = JSON.parse(data).data.games; } catch (e) { return; }
    for (const game of games) {
      let room = rooms.get(game);
      if (!room) { room = new Set(); rooms.set(game, room); }
      room.add(ws);
      ws.games.push(game);
    }
    ws.send(JSON.stringify({ event: 'settings', data: { games } }));
  });
  ws.on('close', () => {
    for (const game of ws.games) {
      const room = rooms.get(game);
      if (room) { room.delete(ws); if (room.size === 0) rooms.delete(game); }
    }
  });
});
wss.on('listening', () => console.log('listening', port));
