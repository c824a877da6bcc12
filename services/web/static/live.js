// The transcript page's live view (services/web/console_live.py): follow the chat's
// server-sent events from where the server-rendered transcript ends and add a row per
// new entry. Text goes in with textContent only: nothing from the stream is parsed as
// HTML. A turn is placed before the rows of its replies when those came first (the core
// stores a turn's jobs before the turn record), as the rendered transcript orders them.
(function () {
  "use strict";
  var table = document.getElementById("transcript");
  if (!table || !window.EventSource) {
    return;
  }
  var body = table.tBodies[0];
  var status = document.getElementById("live-status");
  var source = new EventSource(table.getAttribute("data-events"));

  function say(text) {
    if (status) {
      status.textContent = text;
    }
  }

  function rowOf(row) {
    var tr = document.createElement("tr");
    tr.id = row.id;
    tr.className = "kind-" + row.kind;
    if (row.job) {
      tr.setAttribute("data-job", row.job);
    }
    if (row.replies && row.replies.length) {
      tr.setAttribute("data-replies", row.replies.join(" "));
    }
    ["time", "kind", "text"].forEach(function (key) {
      var td = document.createElement("td");
      td.textContent = String(row[key]);
      tr.appendChild(td);
    });
    return tr;
  }

  function firstReply(replies) {
    for (var i = 0; i < body.rows.length; i++) {
      var job = body.rows[i].getAttribute("data-job");
      if (job && replies.indexOf(job) >= 0) {
        return body.rows[i];
      }
    }
    return null;
  }

  source.addEventListener("ready", function () {
    say("Live: new messages appear as they arrive.");
  });
  source.addEventListener("row", function (event) {
    var row = JSON.parse(event.data).row;
    if (document.getElementById(row.id)) {
      return; // already shown (a reconnect resumes after the last id; this is a guard)
    }
    var empty = document.getElementById("transcript-empty");
    if (empty) {
      empty.remove();
    }
    var tr = rowOf(row);
    body.insertBefore(tr, row.replies.length ? firstReply(row.replies) : null);
  });
  source.addEventListener("unavailable", function (event) {
    say(event.data + "...");
  });
  source.addEventListener("end", function (event) {
    source.close();
    say("Live updates stopped: " + event.data + ". Reload the page (or log in again).");
  });
  source.addEventListener("error", function () {
    if (source.readyState === EventSource.CLOSED) {
      say("Live updates stopped. Reload the page.");
    } else {
      say("Reconnecting...");
    }
  });
})();
